//! Config validation as tables: (input TOML, expected error or expected resolved value),
//! covering each key's accepted values and bounds, and the rewrites that must resolve again.

use vramplan_planner::*;

fn resolve(src: &str) -> Result<RunSpec> {
    let p = Presets::builtin().expect("presets");
    let ctx = Context {
        host_memory: Some(Bytes(16 * GIB)),
        ..Context::default()
    };
    RawConfig::from_toml(src).and_then(|r| r.resolve(&p, &ctx))
}

const GPT2: &str = "[model]\npreset = \"gpt2\"\n";

/// (config text, what the error starts with).
const ERRORS: &[(&str, &str)] = &[
    // [model]
    ("[model]\n", "model is missing: preset = \"NAME\""),
    ("[model]\npreset = \"gpt2\"\narch = \"llama\"\n", "model = several sources"),
    ("[model]\npreset = \"gpt3\"\n", "model.preset = \"gpt3\": no such preset; known:"),
    ("[model]\nhf_config = \"c.json\"\n", "model.hf_config is missing: a readable"),
    ("[model]\narch = \"bert\"\n", "model.arch = \"bert\": expected one of llama | qwen2 | gpt2 | nanochat | t5"),
    ("[model]\narch = \"llama\"\n", "model.hidden_size is missing: a whole number from 1 to 16777216"),
    ("[model]\narch = \"llama\"\nhidden_size = 0\n", "model.hidden_size = 0: a whole number from 1 to 16777216"),
    ("[model]\narch = \"llama\"\nhidden_size = 16777217\n", "model.hidden_size = 16777217: a whole number from 1 to 16777216"),
    ("[model]\narch = \"llama\"\nhidden_size = 64\n", "model.num_layers is missing: a whole number from 1 to 4096"),
    ("[model]\narch = \"llama\"\nhidden_size = 64\nnum_layers = 0\n", "model.num_layers = 0: a whole number from 1 to 4096"),
    // Regression: num_layers had only MAX_DIM as its bound (20,000 layers took 85 s).
    ("[model]\npreset = \"gpt2\"\nnum_layers = 20000\n", "model.num_layers = 20000: a whole number from 1 to 4096"),
    ("[model]\npreset = \"gpt2\"\nnum_layers = 4097\n", "model.num_layers = 4097: a whole number from 1 to 4096"),
    ("[model]\narch = \"t5\"\nhidden_size = 64\nnum_layers = 2\nnum_decoder_layers = 4097\nnum_heads = 4\nvocab_size = 9\n", "model.num_decoder_layers = 4097: a whole number from 1 to 4096"),
    ("[model]\narch = \"llama\"\nhidden_size = 64\nnum_layers = 2\n", "model.num_heads is missing"),
    ("[model]\narch = \"llama\"\nhidden_size = 64\nnum_layers = 2\nnum_heads = 4\nnum_kv_heads = 3\n", "model.num_kv_heads = 3: a divisor of num_heads = 4"),
    ("[model]\narch = \"llama\"\nhidden_size = 65\nnum_layers = 2\nnum_heads = 4\n", "model.head_dim is missing"),
    ("[model]\narch = \"llama\"\nhidden_size = 64\nnum_layers = 2\nnum_heads = 4\n", "model.intermediate_size is missing"),
    ("[model]\narch = \"llama\"\nhidden_size = 64\nnum_layers = 2\nnum_heads = 4\nintermediate_size = 8\n", "model.vocab_size is missing"),
    ("[model]\npreset = \"gpt2\"\nmax_position_embeddings = 0\n", "model.max_position_embeddings = 0"),
    ("[model]\npreset = \"gpt2\"\nhidden_size = -1\n", "line 3: model.hidden_size: invalid value: integer `-1`"),
    ("[model]\npreset = \"gpt2\"\ntie_embeddings = \"yes\"\n", "line 3: model.tie_embeddings: invalid type: string \"yes\", expected a boolean"),
    // [train]
    ("[model]\npreset = \"gpt2\"\n[train]\nmicro_batch = 0\n", "train.micro_batch = 0: a whole number from 1 to 1048576"),
    ("[model]\npreset = \"gpt2\"\n[train]\nmicro_batch = 1048577\n", "train.micro_batch = 1048577: a whole number from 1 to 1048576"),
    ("[model]\npreset = \"gpt2\"\n[train]\ngrad_accum = 0\n", "train.grad_accum = 0: a whole number from 1 to 1048576"),
    ("[model]\npreset = \"gpt2\"\n[train]\ngrad_accum = 1048577\n", "train.grad_accum = 1048577: a whole number from 1 to 1048576"),
    ("[model]\npreset = \"gpt2\"\n[train]\nseq_len = 0\n", "train.seq_len = 0: a whole number from 1 to 16777216"),
    ("[model]\npreset = \"gpt2\"\n[train]\nseq_len = 1025\n", "train.seq_len = 1025: at most max_position_embeddings = 1024 for gpt2"),
    ("[model]\npreset = \"nanochat-d4\"\n[train]\nseq_len = 16777217\n", "train.seq_len = 16777217: a whole number from 1 to 16777216"),
    ("[model]\npreset = \"gpt2\"\n[train]\nprecision = \"fp8\"\n", "train.precision = \"fp8\": expected one of fp32 | bf16-autocast | fp16-autocast | bf16 | bf16-mixed"),
    ("[model]\npreset = \"gpt2\"\n[train]\noptimizer = \"lion\"\n", "train.optimizer = \"lion\": expected one of adamw | adamw-{foreach,fused,single,8bit} | paged-adamw[-8bit] | torchao-adamw-{8bit,4bit} | sgd | adafactor | muon"),
    ("[model]\narch = \"t5\"\nhidden_size = 64\nnum_layers = 2\nnum_heads = 4\nvocab_size = 9\n[train]\noptimizer = \"muon\"\n", "train.optimizer = \"muon\": adamw | adamw-8bit | sgd | adafactor for t5"),
    ("[model]\npreset = \"gpt2\"\n[train]\ncheckpointing = \"half\"\n", "train.checkpointing = \"half\": expected one of none | selective | full | selective-op | every-N (N from 1 to 4096)"),
    ("[model]\npreset = \"gpt2\"\n[train]\nloss = \"cast\"\n", "train.loss = \"cast\": expected one of float-cast | chunked | fused"),
    ("[model]\npreset = \"gpt2\"\n[train]\nloss_chunk = 0\n", "train.loss_chunk = 0: a whole number from 1 to 16777216"),
    ("[model]\npreset = \"gpt2\"\n[train]\nattention = \"flash\"\n", "train.attention = \"flash\": expected one of sdpa | eager"),
    ("[model]\npreset = \"gpt2\"\n[train]\nengine = \"jax\"\n", "train.engine = \"jax\": expected one of torch | candle"),
    ("[model]\npreset = \"gpt2\"\n[train]\nengine = \"candle\"\n", "train.engine = \"candle\": torch for arch gpt2; the candle engine trains llama, qwen2, qwen3, nanochat and t5"),
    ("[model]\npreset = \"gpt2\"\n[train]\nsteps = \"many\"\n", "line 4: train.steps: invalid type: string \"many\", expected u64"),
    // Regression: unknown keys were reported one line early (line 3 here).
    ("[model]\npreset = \"gpt2\"\n[train]\nbatch = 3\n", "line 4: unknown field `batch`, expected one of `micro_batch`"),
    ("[model]\npreset = \"gpt2\"\n\n\n[hardware]\ngpu = \"cpu\"\ncards = 2\n", "line 7: unknown field `cards`"),
    ("[model]\npreset = \"gpt2\"\n[trian]\n", "line 3: unknown field `trian`, expected one of `model`, `train`, `hardware`"),
    ("[model\n", "line 1: "),
    // [hardware]
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"rtx9090\"\n", "hardware.gpu = \"rtx9090\": no such preset; known: auto, cpu, "),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"auto\"\n", "hardware.gpu = \"auto\": a GPU visible through NVML; none was found"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpus = 0\n", "hardware.gpus = 0: a whole number from 1 to 1024"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 1025\n", "hardware.gpus = 1025: a whole number from 1 to 1024"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"cpu\"\ngpus = 2\n", "hardware.gpus = 2: 1 with gpu = \"cpu\""),
    ("[model]\npreset = \"gpt2\"\n[hardware]\nsharding = \"fsdp\"\n", "hardware.sharding = \"fsdp\": expected one of ddp | zero1 | zero2 | zero3 | fsdp2"),
    // Regression: ZeRO on one GPU was accepted and planned as plain DDP.
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\nsharding = \"zero3\"\n", "hardware.sharding = \"zero3\": ddp with gpus = 1: ZeRO shards model state over several GPUs"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 1\nsharding = \"zero1\"\n", "hardware.sharding = \"zero1\": ddp with gpus = 1"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\nmemory_gib = 0.0\n", "hardware.memory_gib = 0: a positive number of GiB"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\nmemory_gib = -1.0\n", "hardware.memory_gib = -1: a positive number of GiB"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\nmemory_gib = nan\n", "hardware.memory_gib = NaN: a positive number of GiB"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\nmemory_gib = 1e7\n", "hardware.memory_gib = 10000000: a positive number of GiB"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ncpu_kernels = \"neon\"\n", "hardware.cpu_kernels = \"neon\": expected one of avx512 | avx2"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ncpu_kernels = \"avx2\"\n", "hardware.cpu_kernels = \"avx2\": no value with a GPU: the key applies to gpu = \"cpu\" only"),
];

#[test]
fn each_bad_value_names_its_key_and_what_is_accepted() {
    for (src, want) in ERRORS {
        let err = resolve(src).expect_err(src).to_string();
        assert!(
            err.starts_with(want),
            "{src:?}\n  got:  {err}\n  want: {want}"
        );
        assert!(!err.contains('\n') && err.chars().count() <= 200, "{err}");
    }
}

/// (config text, what the resolved run must say).
type Check = fn(&RunSpec) -> bool;
const ACCEPTED: &[(&str, Check)] = &[
    // Omitted keys take the defaults of docs/config.md.
    (GPT2, |s| {
        let t = &s.train;
        (t.micro_batch, t.seq_len, t.grad_accum, t.loss_chunk) == (1, 1024, 1, 1024)
            && t.precision == Precision::Bf16Autocast
            && t.optimizer == Optimizer::AdamW
            && t.checkpointing == Checkpointing::None
            && t.loss == LossMode::FloatCast
            && t.attention == Attention::Sdpa
            && t.engine == Engine::Torch
            && s.hardware.device
                == Device::Cpu {
                    capacity: Bytes(16 * GIB),
                    kernels: CpuKernels::Avx512,
                }
            && (s.hardware.gpus, s.hardware.sharding) == (1, Sharding::Ddp)
    }),
    // The config's kernels, else the caller's reading of the machine (none here).
    (
        "[model]\npreset = \"gpt2\"\n[hardware]\ncpu_kernels = \"AVX2\"\n",
        |s| {
            matches!(
                s.hardware.device,
                Device::Cpu {
                    kernels: CpuKernels::Avx2,
                    ..
                }
            )
        },
    ),
    ("[model]\npreset = \"nanochat-d4\"\n", |s| {
        s.train.seq_len == 2048 && s.train.optimizer == Optimizer::Muon && !s.model.tie_embeddings
    }),
];

#[test]
fn omitted_keys_take_their_defaults() {
    for (src, check) in ACCEPTED {
        let s = resolve(src).expect(src);
        assert!(check(&s), "{src:?}: {s:?}");
    }
}

#[test]
fn bounds_are_inclusive_and_choices_case_blind() {
    let rows: &[(&str, Check)] = &[
        ("[model]\npreset = \"gpt2\"\nnum_layers = 4096\n", |s| s.model.num_layers == 4096),
        ("[model]\npreset = \"gpt2\"\n[train]\nseq_len = 1024\nmicro_batch = 1048576\ngrad_accum = 1048576\n", |s| {
            (s.train.micro_batch, s.train.grad_accum) == (1 << 20, 1 << 20)
        }),
        ("[model]\npreset = \"gpt2\"\n[train]\nprecision = \" FP32 \"\n", |s| s.train.precision == Precision::Fp32),
        ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 1024\nsharding = \"zero3\"\n", |s| {
            s.hardware.gpus == 1024 && s.hardware.sharding == Sharding::Zero3
        }),
        ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\nmemory_gib = 40.0\n", |s| {
            s.hardware.device.capacity() == Bytes(40 * GIB)
        }),
        ("[model]\npreset = \"gpt2\"\n[hardware]\nmemory_gib = 0.5\n", |s| {
            s.hardware.device.capacity() == Bytes(GIB / 2)
        }),
        // A preset's head_dim holds while hidden_size and num_heads do; either one re-derives it.
        ("[model]\npreset = \"gpt2\"\nhidden_size = 1536\n", |s| s.model.head_dim == 128),
        ("[model]\npreset = \"gpt2\"\nnum_layers = 2\n", |s| s.model.head_dim == 64 && s.model.name == "gpt2"),
        (LLAMA_2, |s| s.model.head_dim == 16 && s.model.num_kv_heads == 4 && s.model.tie_embeddings),
        ("[model]\narch = \"t5\"\nhidden_size = 64\nnum_layers = 3\nnum_heads = 4\nvocab_size = 9\n", |s| {
            s.model.num_decoder_layers == 3 && s.model.intermediate_size == 256
        }),
        ("[model]\npreset = \"gpt2\"\n[train]\nsteps = 5\nlearning_rate = 0.01\n", |s| s.train.seq_len == 1024),
    ];
    for (src, check) in rows {
        let s = resolve(src).expect(src);
        assert!(check(&s), "{src:?}: {s:?}");
    }
}

const LLAMA_2: &str = "[model]\narch = \"llama\"\nhidden_size = 64\nnum_layers = 2\nnum_heads = 4\nintermediate_size = 128\nvocab_size = 256\n";

#[test]
fn errors_quote_at_most_a_short_line_of_a_value() {
    // Regression: values were echoed whole, newlines and all.
    let long = "x".repeat(10_000);
    for src in [
        format!("{GPT2}[train]\nprecision = \"{long}\"\n"),
        format!("{GPT2}[train]\nprecision = \"bf16\\nfp32\\n\"\n"),
        format!("[model]\npreset = \"{long}\"\n"),
        format!("{GPT2}[hardware]\ngpu = \"a\\nb{long}\"\n"),
        format!("{GPT2}[train]\n{long} = 1\n"),
    ] {
        let err = resolve(&src).unwrap_err().to_string();
        assert!(!err.contains('\n'), "{err}");
        assert!(
            err.chars().count() <= 200,
            "{} chars: {err}",
            err.chars().count()
        );
    }
    let err = resolve(&format!("{GPT2}[train]\nprecision = \"{long}\"\n")).unwrap_err();
    let want = format!(
        "train.precision = \"{}…\": expected one of",
        "x".repeat(QUOTE_CHARS)
    );
    assert!(err.to_string().starts_with(&want), "{err}");
    let err = resolve(&format!("{GPT2}[train]\noptimizer = \"a\\nb\"\n")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("train.optimizer = \"a\\nb\": expected one of"),
        "{err}"
    );
}

/// A run config with every engine-only key set, as `vramplan train` reads it.
const WITH_ENGINE_KEYS: &str = "[model]\npreset = \"nanochat-d4\"\n[train]\nmicro_batch = 2\nseq_len = 256\nengine = \"candle\"\nsteps = 300\nlearning_rate = 0.003\n[hardware]\ngpu = \"cpu\"\nmemory_gib = 12.5\n";

#[test]
fn rewriting_a_plan_keeps_the_keys_the_memory_model_does_not_read() {
    // Regression: the rewrite behind `fit --out`, `diagnose --out` and `plan.fit.toml`
    // dropped `steps` and `learning_rate` (and the memory limit).
    let raw = RawConfig::from_toml(WITH_ENGINE_KEYS).unwrap();
    let mut spec = resolve(WITH_ENGINE_KEYS).unwrap();
    spec.train.micro_batch = 1;
    spec.train.grad_accum = 2;
    let text = raw.with_spec(&spec).to_toml().unwrap();
    let again = RawConfig::from_toml(&text).unwrap();
    assert_eq!(again.train.steps, Some(300), "{text}");
    assert_eq!(again.train.learning_rate, Some(0.003), "{text}");
    assert_eq!(again.hardware.memory_gib, Some(12.5), "{text}");
    assert_eq!(again.model, raw.model);
    assert_eq!(resolve(&text).unwrap(), spec);
}

#[test]
fn to_toml_returns_its_error_instead_of_an_empty_plan() {
    // NaN is written as `nan` but never reads back equal: the plan is refused, not written.
    let mut raw = RawConfig::from_toml(GPT2).unwrap();
    raw.hardware.memory_gib = Some(f64::NAN);
    let err = raw.to_toml().unwrap_err().to_string();
    assert!(err.starts_with("cannot write the plan as TOML"), "{err}");
    raw.hardware.memory_gib = Some(8.0);
    raw.train.steps = Some(u64::MAX);
    assert_eq!(RawConfig::from_toml(&raw.to_toml().unwrap()).unwrap(), raw);
}

#[test]
fn every_plan_fit_writes_resolves_to_the_same_run() {
    // Regression: fit offered accumulation past MAX_COUNT, which estimate then refused.
    let cases = [
        ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\n", GlobalBatch::Sequences(1 << 21)),
        ("[model]\npreset = \"smollm2-135m\"\n[hardware]\ngpu = \"rtx4060-laptop-8gb\"\n", GlobalBatch::Sequences(64)),
        ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 4\nsharding = \"zero2\"\n", GlobalBatch::Sequences(3 << 20)),
        (WITH_ENGINE_KEYS, GlobalBatch::Free),
    ];
    let mut checked = 0;
    for (src, global) in cases {
        let raw = RawConfig::from_toml(src).unwrap();
        let req = FitRequest {
            base: resolve(src).unwrap(),
            seq_len: Some(256),
            global,
            margin: 0.0,
            allow_fused: false,
            keep: Vec::new(),
        };
        let r = fit(&req).unwrap_or_else(|e| panic!("{src}: {e}"));
        for c in &r.candidates {
            let text = raw.with_spec(&c.spec).to_toml().unwrap();
            let again = resolve(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(again, c.spec, "{text}");
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} plans checked");
}

const NANOCHAT: &str = "[model]\npreset = \"nanochat-d4\"\n";
const SMOLLM: &str = "[model]\npreset = \"smollm2-135m\"\n";

#[test]
fn implementation_and_compile_refuse_what_is_not_modelled() {
    let cases = [
        (format!("{GPT2}[train]\nimplementation = \"megatron\"\n"), "train.implementation = \"megatron\": expected one of hf | nanochat | torchtitan | torchtune"),
        (format!("{NANOCHAT}[train]\nimplementation = \"hf\"\n"), "train.implementation = \"hf\": nanochat for arch nanochat"),
        (format!("{GPT2}[train]\nimplementation = \"torchtune\"\n"), "train.implementation = \"torchtune\": hf for arch gpt2"),
        (format!("{SMOLLM}[train]\nimplementation = \"nanochat\"\n"), "train.implementation = \"nanochat\": hf | torchtitan | torchtune for arch llama"),
        (format!("{SMOLLM}[train]\nimplementation = \"torchtune\"\ncompile = true\ncheckpointing = \"selective-op\"\n"), "train.compile = true: false with checkpointing = \"selective-op\""),
        (format!("{GPT2}[train]\ncompile = true\n"), "train.compile = true: false for arch gpt2: compile is modelled for llama, qwen2 and nanochat"),
        (format!("{SMOLLM}[train]\ncompile = true\ncheckpointing = \"full\"\n"), "train.compile = true: false with checkpointing = \"full\""),
        (format!("{SMOLLM}[train]\ncompile = true\nattention = \"eager\"\n"), "train.compile = true: false with attention = \"eager\""),
        (format!("{SMOLLM}[train]\ncompile = \"yes\"\n"), "line 4: train.compile: invalid type: string \"yes\", expected a boolean"),
        (format!("{SMOLLM}[train]\nembedding_dtype = \"bf16\"\n"), "train.embedding_dtype = \"bf16\": only for implementation = \"nanochat\" on the torch engine"),
        (format!("{NANOCHAT}[train]\nembedding_dtype = \"fp16\"\n"), "train.embedding_dtype = \"fp16\": expected one of fp32 | bf16"),
        (format!("{NANOCHAT}[train]\nprecision = \"fp32\"\nembedding_dtype = \"bf16\"\n"), "train.embedding_dtype = \"bf16\": fp32 with precision = \"fp32\""),
    ];
    for (src, want) in cases {
        let err = resolve(&src).expect_err(&src).to_string();
        assert!(err.starts_with(want), "{src}\n got: {err}\nwant: {want}");
    }
}

const LLAMA_H100: &str = "[model]\npreset = \"smollm2-135m\"\n[hardware]\ngpu = \"h100-80gb\"\n";

/// (config text, what the error starts with) for the regime keys (issue 10).
const REGIME_ERRORS: &[(&str, &str)] = &[
    ("[model]\npreset = \"gpt2\"\n[train]\ncheckpointing = \"every-0\"\n", "train.checkpointing = \"every-0\": expected one of none | selective | full | selective-op | every-N"),
    ("[model]\npreset = \"gpt2\"\n[train]\ncheckpointing = \"every-two\"\n", "train.checkpointing = \"every-two\": expected one of"),
    ("[model]\npreset = \"gpt2\"\n[train]\ncheckpointing = \"every-4097\"\n", "train.checkpointing = \"every-4097\": expected one of"),
    ("[model]\npreset = \"gpt2\"\n[train]\ncheckpointing = \"selective-op\"\n", "train.checkpointing = \"selective-op\": none | selective | full | every-N for arch gpt2"),
    ("[model]\npreset = \"gpt2\"\n[train]\nreduce_dtype = \"fp16\"\n", "train.reduce_dtype = \"fp16\": expected one of fp32 | bf16"),
    ("[model]\npreset = \"gpt2\"\n[train]\nreduce_dtype = \"bf16\"\n", "train.reduce_dtype = \"bf16\": fp32 unless precision = \"bf16-mixed\" or implementation = \"torchtitan\""),
    ("[model]\npreset = \"gpt2\"\n[train]\noffload_activations = 1\n", "line 4: train.offload_activations: invalid type: integer `1`, expected a boolean"),
    ("[model]\npreset = \"gpt2\"\n[train]\noffload_activations = true\n", "train.offload_activations = true: false with gpu = \"cpu\""),
    ("[model]\npreset = \"gpt2\"\n[train]\noptimizer_in_backward = true\ngrad_accum = 2\n", "train.optimizer_in_backward = true: false with grad_accum above 1"),
    ("[model]\npreset = \"nanochat-d4\"\n[train]\noptimizer_in_backward = true\n", "train.optimizer_in_backward = true: false with optimizer = \"muon\""),
    ("[model]\npreset = \"gpt2\"\n[train]\noptimizer_in_backward = true\nprecision = \"bf16-mixed\"\n", "train.optimizer_in_backward = true: false with precision = \"bf16-mixed\""),
    ("[model]\npreset = \"gpt2\"\n[train]\noptimizer_in_backward = true\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 2\nsharding = \"zero2\"\n", "train.optimizer_in_backward = true: false with several GPUs unless sharding = \"fsdp2\""),
    ("[model]\npreset = \"gpt2\"\n[train]\noptimizer = \"paged-adamw\"\n", "train.optimizer = \"paged-adamw\": a GPU: paged optimizers keep their state in CUDA managed memory"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\nsharding = \"fsdp2\"\n", "hardware.sharding = \"fsdp2\": ddp with gpus = 1"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\noffload_optimizer = \"nvme\"\nsharding = \"zero2\"\n", "hardware.offload_optimizer = \"nvme\": expected one of none | cpu"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\noffload_params = \"disk\"\nsharding = \"zero3\"\n", "hardware.offload_params = \"disk\": expected one of none | cpu"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\noffload_optimizer = \"cpu\"\n", "hardware.offload_optimizer = \"cpu\": \"none\" unless sharding = \"zero1\" | \"zero2\" | \"zero3\""),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 2\nsharding = \"fsdp2\"\noffload_optimizer = \"cpu\"\n", "hardware.offload_optimizer = \"cpu\": \"none\" unless sharding = \"zero1\""),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\nsharding = \"zero2\"\noffload_params = \"cpu\"\n", "hardware.offload_params = \"cpu\": \"none\" unless sharding = \"zero3\""),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"cpu\"\nsharding = \"zero2\"\noffload_optimizer = \"cpu\"\n", "hardware.offload_optimizer = \"cpu\": \"none\" unless gpu is a GPU"),
    ("[model]\npreset = \"gpt2\"\n[train]\noptimizer = \"sgd\"\nprecision = \"fp32\"\n[hardware]\ngpu = \"h100-80gb\"\nsharding = \"zero2\"\noffload_optimizer = \"cpu\"\n", "hardware.offload_optimizer = \"cpu\": \"none\" unless optimizer is an adamw"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\nsharding = \"zero2\"\noffload_optimizer = \"cpu\"\n", "hardware.offload_optimizer = \"cpu\": \"none\" unless precision = \"fp32\" | \"bf16-mixed\""),
    // Several CPU processes are measured under FSDP2 and ZeRO (tests/data/torch_fsdp.json,
    // tests/data/deepspeed_zero_cpu.json), not under DDP.
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"cpu\"\ngpus = 2\nsharding = \"ddp\"\n", "hardware.gpus = 2: 1 with gpu = \"cpu\" unless sharding = \"fsdp2\" | \"zero1\""),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"cpu\"\ngpus = 2\nsharding = \"zero2\"\nreduce_bucket_size = 0\n", "hardware.reduce_bucket_size = 0: a whole number of elements from 1 to"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 2\nsharding = \"zero3\"\nstage3_max_reuse_distance = 2000000000000\n", "hardware.stage3_max_reuse_distance = 2000000000000: a whole number of elements from 0 to"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 2\nsharding = \"zero1\"\nallgather_bucket_size = 5\n", "hardware.allgather_bucket_size = 5: an even number of elements"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 4\nsharding = \"zero3\"\nreshard_after_forward = false\n", "hardware.reshard_after_forward = false: true unless sharding = \"fsdp2\""),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 4\nsharding = \"zero3\"\ngpus_per_node = 2\n", "hardware.gpus_per_node = 2: gpus = 4 unless sharding = \"fsdp2\""),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 6\nsharding = \"fsdp2\"\ngpus_per_node = 4\n", "hardware.gpus_per_node = 4: a divisor of gpus = 6"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 4\nsharding = \"fsdp2\"\ngpus_per_node = 8\n", "hardware.gpus_per_node = 8: a divisor of gpus = 4"),
    ("[model]\npreset = \"gpt2\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 4\nsharding = \"fsdp2\"\ngpus_per_node = 0\n", "hardware.gpus_per_node = 0: a whole number from 1 to 1024"),
    ("[model]\npreset = \"nanochat-d4\"\n[train]\nengine = \"candle\"\ncheckpointing = \"every-2\"\n", "train.checkpointing = \"every-2\": the torch engine: the candle engine trains without it"),
    ("[model]\npreset = \"nanochat-d4\"\n[train]\nengine = \"candle\"\nprecision = \"bf16-mixed\"\n", "train.precision = \"bf16-mixed\": the torch engine"),
];

#[test]
fn each_bad_regime_names_its_key_and_what_is_accepted() {
    for (src, want) in REGIME_ERRORS {
        let err = resolve(src).expect_err(src).to_string();
        assert!(
            err.starts_with(want),
            "{src:?}\n  got:  {err}\n  want: {want}"
        );
        assert!(!err.contains('\n') && err.chars().count() <= 200, "{err}");
    }
}

#[test]
fn implementation_defaults_per_architecture_and_round_trips() {
    // (config, implementation, compile) as resolved.
    let cases = [
        (NANOCHAT.to_string(), Implementation::Nanochat, false),
        (SMOLLM.to_string(), Implementation::Hf, false),
        (GPT2.to_string(), Implementation::Hf, false),
        (
            format!("{NANOCHAT}[train]\ncompile = true\n"),
            Implementation::Nanochat,
            true,
        ),
        (
            format!("{SMOLLM}[train]\nimplementation = \"TorchTune\"\ncompile = true\n"),
            Implementation::Torchtune,
            true,
        ),
        (
            format!("{SMOLLM}[train]\nimplementation = \"torchtitan\"\ncompile = true\n"),
            Implementation::Torchtitan,
            true,
        ),
    ];
    for (src, code, compile) in cases {
        let spec = resolve(&src).unwrap_or_else(|e| panic!("{src}: {e}"));
        assert_eq!(
            (spec.train.implementation, spec.train.compile),
            (code, compile),
            "{src}"
        );
        let raw = RawConfig::from_toml(&src).unwrap();
        let text = raw.with_spec(&spec).to_toml().unwrap();
        assert_eq!(resolve(&text).unwrap(), spec, "{text}");
        // A plan spells out what its config named, and only that (the defaults stand).
        let named = raw.train.implementation.is_some();
        assert_eq!(text.contains("implementation"), named, "{text}");
        assert_eq!(
            text.contains("compile"),
            raw.train.compile.is_some(),
            "{text}"
        );
    }
}

#[test]
fn regime_keys_resolve_with_their_defaults_and_values() {
    let rows: &[(String, Check)] = &[
        (LLAMA_H100.to_string(), |s| {
            let (t, h) = (&s.train, &s.hardware);
            !t.offload_activations
                && !t.optimizer_in_backward
                && t.reduce_dtype == ReduceDtype::Fp32
                && h.reshard_after_forward
                && h.gpus_per_node == 1
                && h.shard_group() == 1
        }),
        (format!("{LLAMA_H100}[train]\ncheckpointing = \"every-3\"\n"), |s| {
            s.train.checkpointing == Checkpointing::Every(3)
        }),
        (format!("{LLAMA_H100}[train]\ncheckpointing = \"Selective-Op\"\n"), |s| {
            s.train.checkpointing == Checkpointing::SelectiveOp
        }),
        (format!("{LLAMA_H100}[train]\noptimizer = \"paged-adamw-8bit\"\noffload_activations = true\noptimizer_in_backward = true\n"), |s| {
            s.train.optimizer == Optimizer::PagedAdamW8bit
                && s.train.offload_activations
                && s.train.optimizer_in_backward
        }),
        (format!("{LLAMA_H100}[train]\nprecision = \"bf16-mixed\"\nreduce_dtype = \"bf16\"\n"), |s| {
            s.train.precision == Precision::Bf16Mixed && s.train.reduce_dtype == ReduceDtype::Bf16
        }),
        ("[model]\npreset = \"smollm2-135m\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 16\nsharding = \"fsdp2\"\ngpus_per_node = 8\nreshard_after_forward = false\n".to_string(), |s| {
            let h = &s.hardware;
            h.sharding == Sharding::Fsdp2 && h.shard_group() == 8 && !h.reshard_after_forward
        }),
        ("[model]\npreset = \"smollm2-135m\"\n[train]\noptimizer_in_backward = true\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 4\nsharding = \"fsdp2\"\n".to_string(), |s| {
            s.train.optimizer_in_backward && s.hardware.shard_group() == 4
        }),
        // DeepSpeed runs ZeRO on one GPU when it offloads.
        ("[model]\npreset = \"smollm2-135m\"\n[train]\nprecision = \"bf16-mixed\"\n[hardware]\ngpu = \"h100-80gb\"\nsharding = \"zero3\"\noffload_optimizer = \"CPU\"\noffload_params = \"cpu\"\n".to_string(), |s| {
            let h = &s.hardware;
            h.gpus == 1 && h.sharding == Sharding::Zero3 && h.offload_optimizer == Offload::Cpu && h.offload_params == Offload::Cpu
        }),
        // gpu = "cpu" with gpus = N: N processes on one host, each sharding over all N.
        ("[model]\npreset = \"smollm2-135m\"\n[train]\nprecision = \"bf16-mixed\"\n[hardware]\ngpu = \"cpu\"\ngpus = 4\nsharding = \"fsdp2\"\nreshard_after_forward = false\n".to_string(), |s| {
            let h = &s.hardware;
            !h.device.is_cuda() && h.gpus == 4 && h.shard_group() == 4 && !h.reshard_after_forward
        }),
    ];
    for (src, check) in rows {
        let s = resolve(src).expect(src);
        assert!(check(&s), "{src:?}: {s:?}");
    }
    for (name, o) in Optimizer::ALL {
        let src = format!("{LLAMA_H100}[train]\noptimizer = \"{name}\"\n");
        assert_eq!(resolve(&src).expect(&src).train.optimizer, *o);
    }
}

#[test]
fn regime_keys_are_written_back_into_plans() {
    let src = "[model]\npreset = \"smollm2-135m\"\n[train]\ncheckpointing = \"every-2\"\noptimizer = \"adamw-fused\"\nprecision = \"bf16-mixed\"\nreduce_dtype = \"bf16\"\n[hardware]\ngpu = \"h100-80gb\"\ngpus = 8\nsharding = \"fsdp2\"\ngpus_per_node = 4\nreshard_after_forward = false\n";
    let raw = RawConfig::from_toml(src).unwrap();
    let spec = resolve(src).unwrap();
    let text = raw.with_spec(&spec).to_toml().unwrap();
    assert_eq!(resolve(&text).unwrap(), spec, "{text}");
    assert!(text.contains("checkpointing = \"every-2\""), "{text}");
}

#[test]
fn offload_keys_are_written_back_only_when_named_or_on() {
    let src = "[model]\npreset = \"smollm2-135m\"\n[train]\nprecision = \"fp32\"\n[hardware]\ngpu = \"h100-80gb\"\nsharding = \"zero2\"\noffload_optimizer = \"cpu\"\n";
    let raw = RawConfig::from_toml(src).unwrap();
    let spec = resolve(src).unwrap();
    let text = raw.with_spec(&spec).to_toml().unwrap();
    assert_eq!(resolve(&text).unwrap(), spec, "{text}");
    assert!(text.contains("offload_optimizer = \"cpu\""), "{text}");
    assert!(!text.contains("offload_params"), "{text}");
    let plain = resolve(LLAMA_H100).unwrap();
    let text = RawConfig::from_toml(LLAMA_H100)
        .unwrap()
        .with_spec(&plain)
        .to_toml()
        .unwrap();
    assert!(!text.contains("offload"), "{text}");
}
