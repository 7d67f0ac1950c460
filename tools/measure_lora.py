#!/usr/bin/env python3
"""Ground truth for LoRA, QLoRA and the newer model families on CPU: the peak live memory
of ONE steady-state training step, measured as tools/measure_torch.py measures it.

Usage:
    python tools/measure_lora.py [--out tests/data/torch_lora.json] [--only ID_SUBSTRING] [--list]

What differs from tools/measure_torch.py (whose helpers do the measuring: warm-up step,
one profiled step, export_memory_timeline, the pre-existing-tensor check):
  * models are transformers' real classes built from the committed config.json files in
    tests/data/hf_configs/ with the sizes shrunk (hidden, layers, heads, widths, vocab,
    window, experts) and everything else as released (norms, QK-norm, fused projections,
    soft-capping, the sliding/global layer pattern, the router);
  * LoRA runs wrap the model with PEFT's get_peft_model(LoraConfig(...)) (peft 0.21,
    autocast_adapter_dtype=True, so adapters are fp32 whatever the base dtype);
    precision "bf16" means: base weights cast to bf16 BEFORE wrapping, fp32 adapters, no
    autocast (PEFT casts each adapter's input to fp32); "bf16-autocast": fp32 base and
    adapters, torch.autocast around the forward; "fp32": no casts;
  * AdamW is built over model.parameters() as in measure_torch.py: frozen parameters
    never get a gradient, so they get no optimizer state either;
  * with checkpointing the model's gradient_checkpointing_enable() is called before
    wrapping (as PEFT documents), which makes the embedding output require grad;
  * MoE routing depends on the data: torch.manual_seed(0) fixes the token ids and the
    router's initial weights, so each run is reproducible; the run records how many
    tokens the busiest expert of each layer received ("expert_tokens_max").
"""

import argparse
import copy
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure_torch as mt  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "hf_configs")

# Shrunk sizes: same structure, small enough for a CPU.
SMALL = dict(hidden_size=256, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=64, intermediate_size=688, vocab_size=2048)


def hf_dict(source, **overrides):
    """The committed config.json of `source`, text part only, with `overrides` applied."""
    with open(os.path.join(CONFIG_DIR, source + ".json")) as f:
        d = json.load(f)
    if d.get("model_type") == "gemma3" and "text_config" in d:
        d = dict(d["text_config"], model_type="gemma3_text")
    # Long-context rope tables are sized for the released head_dim; the memory of a step
    # does not depend on them.
    d.pop("rope_scaling", None)
    d.pop("quantization_config", None)
    # Built in fp32 like tools/measure_torch.py: from_config would honour torch_dtype.
    d.pop("torch_dtype", None)
    d.pop("dtype", None)
    d.update(SMALL)
    if d["model_type"] == "phi3" or d["model_type"] == "olmo2":
        d["num_key_value_heads"] = overrides.pop("num_key_value_heads", 4)
    if "num_experts" in d or "num_local_experts" in d:
        d["intermediate_size" if d["model_type"] == "mixtral" else "moe_intermediate_size"] = 256
    if d.get("layer_types"):
        d.pop("layer_types")
    # Token ids of the released vocabulary do not fit the small one.
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        d[key] = 0
    d.update(overrides)
    return d


def planner_model(d):
    """The [model] section of vramplan's config for the HF config `d`."""
    t = d["model_type"]
    arch = {"mistral": "llama", "smollm3": "llama", "gemma3_text": "gemma3"}.get(t, t)
    heads = d["num_attention_heads"]
    m = {
        "arch": arch,
        "hidden_size": d["hidden_size"],
        "num_layers": d["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": d.get("num_key_value_heads", heads),
        "head_dim": d.get("head_dim", d["hidden_size"] // heads),
        "intermediate_size": d["intermediate_size"],
        "vocab_size": d["vocab_size"],
        "tie_embeddings": bool(d.get("tie_word_embeddings", t.startswith("gemma"))),
    }
    windowed = {"mistral": True, "phi3": True, "gemma2": True, "gemma3_text": True}.get(t, False)
    if windowed and d.get("sliding_window"):
        m["sliding_window"] = d["sliding_window"]
        m["global_every"] = {"gemma2": 2, "gemma3_text": d.get("sliding_window_pattern", 6)}.get(t, 0)
    if "num_local_experts" in d or "num_experts" in d:
        m["num_experts"] = d.get("num_local_experts", d.get("num_experts"))
        m["experts_per_token"] = d["num_experts_per_tok"]
        m["expert_intermediate_size"] = d.get("moe_intermediate_size", d["intermediate_size"])
    return m


def _lora(rank=16, targets=("q_proj", "v_proj"), dropout=0.0, alpha=None, **extra):
    out = {"rank": rank, "alpha": alpha or 2 * rank, "dropout": dropout,
           "target_modules": targets if isinstance(targets, str) else list(targets)}
    out.update(extra)
    return out


ALL = "all-linear"


def configs():
    T = mt._train
    runs = [
        # -- full fine-tuning of each new family ------------------------------------
        ("qwen3-8b", {}, T(2, 512, "fp32"), None),
        ("qwen3-8b", {}, T(2, 512, "bf16-autocast"), None),
        ("qwen3-8b", {}, T(2, 512, "bf16-autocast", "sdpa", "full"), None),
        ("mistral-7b", {"sliding_window": 128}, T(2, 512, "fp32"), None),
        ("mistral-7b", {"sliding_window": 128}, T(2, 512, "bf16-autocast"), None),
        ("mistral-7b", {"sliding_window": 128}, T(2, 512, "fp32", "eager"), None),
        ("gemma-2-2b", {"sliding_window": 128}, T(2, 512, "fp32", "eager"), None),
        ("gemma-2-2b", {"sliding_window": 128}, T(2, 512, "bf16-autocast", "eager"), None),
        ("gemma-3-1b", {"sliding_window": 64, "num_hidden_layers": 6}, T(2, 512, "fp32"), None),
        ("gemma-3-1b", {"sliding_window": 64, "num_hidden_layers": 6}, T(2, 512, "bf16-autocast"), None),
        ("phi-3.5-mini", {}, T(2, 512, "fp32"), None),
        ("phi-3.5-mini", {}, T(2, 512, "bf16-autocast"), None),
        ("olmo-2-1b", {}, T(2, 512, "fp32"), None),
        ("olmo-2-1b", {}, T(2, 512, "bf16-autocast"), None),
        ("smollm3-3b", {}, T(2, 512, "fp32"), None),
        ("mixtral-8x7b", {}, T(2, 512, "fp32"), None),
        ("mixtral-8x7b", {}, T(2, 512, "bf16-autocast"), None),
        ("qwen3-30b-a3b", {"num_experts": 16, "num_experts_per_tok": 4}, T(2, 512, "fp32"), None),
        ("qwen3-30b-a3b", {"num_experts": 16, "num_experts_per_tok": 4}, T(2, 512, "bf16-autocast"), None),
        # -- LoRA: ranks, targets, dropout, checkpointing, precisions ------------------
        ("llama-3.2-3b", {}, T(2, 512, "fp32"), _lora(16)),
        ("llama-3.2-3b", {}, T(2, 512, "fp32"), _lora(64)),
        ("llama-3.2-3b", {}, T(2, 512, "fp32"), _lora(16, ALL)),
        ("llama-3.2-3b", {}, T(2, 512, "fp32"), _lora(16, ALL, 0.05)),
        ("llama-3.2-3b", {}, T(2, 512, "fp32", "sdpa", "full"), _lora(16, ALL)),
        ("llama-3.2-3b", {}, T(2, 512, "bf16-autocast"), _lora(16)),
        ("llama-3.2-3b", {}, T(2, 512, "bf16-autocast"), _lora(16, ALL)),
        ("llama-3.2-3b", {}, T(2, 512, "bf16-autocast"), _lora(16, ALL, 0.1)),
        ("llama-3.2-3b", {}, T(2, 512, "bf16-autocast", "sdpa", "full"), _lora(16, ALL)),
        ("llama-3.2-3b", {}, T(2, 512, "bf16"), _lora(8)),
        ("llama-3.2-3b", {}, T(2, 512, "bf16"), _lora(16, ALL)),
        ("llama-3.2-3b", {}, T(2, 512, "bf16"), _lora(16, ALL, 0.05)),
        ("llama-3.2-3b", {}, T(2, 512, "bf16", "sdpa", "full"), _lora(16, ALL)),
        ("llama-3.2-3b", {}, T(4, 384, "bf16"), _lora(32, ALL)),
        ("llama-3.2-3b", {}, T(2, 512, "fp32"), _lora(16, ("q_proj", "k_proj", "v_proj", "o_proj"))),
        ("llama-3.2-3b", {}, T(2, 512, "fp32"), _lora(16, ("gate_proj", "up_proj", "down_proj"))),
        ("qwen2.5-1.5b", {}, T(2, 512, "fp32"), _lora(16, ALL)),
        ("qwen2.5-1.5b", {}, T(2, 512, "bf16"), _lora(16, ALL)),
        ("qwen3-8b", {}, T(2, 512, "fp32"), _lora(16, ALL)),
        ("qwen3-8b", {}, T(2, 512, "bf16"), _lora(64, ALL)),
        ("qwen3-8b", {}, T(2, 512, "bf16-autocast", "sdpa", "full"), _lora(16, ALL)),
        ("mistral-7b", {"sliding_window": 128}, T(2, 512, "bf16"), _lora(16, ALL)),
        ("gemma-2-2b", {"sliding_window": 128}, T(2, 512, "bf16", "eager"), _lora(16, ALL)),
        ("gemma-3-1b", {"sliding_window": 64, "num_hidden_layers": 6}, T(2, 512, "bf16"), _lora(16, ALL)),
        ("phi-3.5-mini", {}, T(2, 512, "bf16"), _lora(16, ALL)),
        ("olmo-2-1b", {}, T(2, 512, "bf16"), _lora(16, ALL)),
        ("mixtral-8x7b", {}, T(2, 512, "bf16"), _lora(16, ("q_proj", "k_proj", "v_proj", "o_proj"))),
        ("llama-3.2-3b", {}, T(2, 512, "fp32"), _lora(16, ("q_proj", "v_proj"), modules_to_save=["lm_head"])),
        # -- QLoRA: bitsandbytes 4-bit / 8-bit base linears, bf16 everything else ------
        ("llama-3.2-3b", {}, T(2, 512, "bf16"), _lora(16, ("q_proj", "v_proj"), quantize="nf4")),
        ("llama-3.2-3b", {}, T(2, 512, "bf16"), _lora(16, ALL, quantize="nf4")),
        ("llama-3.2-3b", {}, T(2, 512, "bf16"), _lora(16, ALL, quantize="nf4", double_quant=False)),
        ("llama-3.2-3b", {}, T(2, 512, "bf16"), _lora(16, ALL, quantize="fp4")),
        ("llama-3.2-3b", {}, T(2, 512, "bf16", "sdpa", "full"), _lora(16, ALL, quantize="nf4")),
        ("qwen3-8b", {}, T(2, 512, "bf16"), _lora(16, ALL, quantize="nf4")),
        ("llama-3.2-3b", {}, T(2, 512, "bf16"), _lora(16, ALL, quantize="int8")),
        # Qwen3-8B's QLoRA at micro-batch 1 as on an 8 GB card: the real vocabulary (the
        # untied bf16 embedding and head, the logits dominate there), 2 shallow blocks.
        ("qwen3-8b", {"vocab_size": 151936, "num_hidden_layers": 2}, T(1, 1024, "bf16", "sdpa", "full"),
         _lora(16, ALL, quantize="nf4")),
    ]
    out = []
    for source, over, t, lora in runs:
        d = hf_dict(source, **over)
        m = planner_model(d)
        parts = [source, m["arch"], f"h{m['hidden_size']}", f"l{m['num_layers']}"]
        if m["vocab_size"] != SMALL["vocab_size"]:
            parts.append(f"v{m['vocab_size']}")
        parts += [f"b{t['micro_batch']}", f"s{t['seq_len']}", t["precision"], t["attention"], t["checkpointing"]]
        if lora:
            tm = lora["target_modules"]
            parts += [f"lora-r{lora['rank']}", "all" if tm == ALL else "+".join(x.split("_")[0] for x in tm)]
            if lora["dropout"]:
                parts.append(f"drop{lora['dropout']}")
            if lora.get("modules_to_save"):
                parts.append("save-" + "+".join(lora["modules_to_save"]))
            if lora.get("quantize"):
                parts.append(lora["quantize"] + ("" if lora.get("double_quant", True) else "-nodq"))
        cfg = {"id": "-".join(parts), "model": m, "train": t, "hardware": {"gpu": "cpu"}, "hf": d}
        if lora:
            cfg["lora"] = lora
        out.append(cfg)
    ids = [c["id"] for c in out]
    assert len(ids) == len(set(ids)), "duplicate run ids"
    return out


def build_model(cfg):
    """transformers' class for cfg["hf"], PEFT-wrapped when cfg has a lora section."""
    import transformers

    d, t, lora = cfg["hf"], cfg["train"], cfg.get("lora")
    fields = {k: v for k, v in d.items() if k != "model_type"}
    fields.update(use_cache=False, attention_dropout=0.0, max_position_embeddings=max(2048, t["seq_len"]))
    config = transformers.AutoConfig.for_model(d["model_type"], **fields)
    config._attn_implementation = t["attention"]
    model = transformers.AutoModelForCausalLM.from_config(config)
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"{cfg['id']}: built with {dtypes}, expected fp32")
    got = model.config._attn_implementation
    if got != t["attention"]:
        raise RuntimeError(f"{cfg['id']}: asked for attention {t['attention']}, model uses {got}")
    if t["checkpointing"] == "full":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable()
    if lora is None:
        return model, (lambda x: model(input_ids=x, labels=x).loss)
    import peft

    if cfg.get("base_bf16"):
        model.to(torch.bfloat16)
    if lora.get("quantize", "none") != "none":
        quantize(model, lora)
    lc = peft.LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"], modules_to_save=lora.get("modules_to_save"),
        use_dora=lora.get("use_dora", False), task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(model, lc, autocast_adapter_dtype=True)
    return pm, (lambda x: pm(input_ids=x, labels=x).loss)


def quantize(model, lora):
    """Every nn.Linear of the decoder blocks becomes bitsandbytes' Linear4bit (nf4/fp4,
    double quantization as asked) or Linear8bitLt, quantized on the CPU from the
    initialized weight; the embedding, the norms and the head stay as they are."""
    import bitsandbytes as bnb

    compute = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        lora.get("compute_dtype", "bf16")]
    layers = model.model.layers
    for layer in layers:
        for name, mod in list(layer.named_modules()):
            if not isinstance(mod, torch.nn.Linear):
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            w = mod.weight.data.float()
            if lora["quantize"] == "int8":
                q = bnb.nn.Linear8bitLt(mod.in_features, mod.out_features, bias=False,
                                        has_fp16_weights=False)
                q.weight = bnb.nn.Int8Params(w.to(compute), requires_grad=False, has_fp16_weights=False)
            else:
                q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=compute,
                                      quant_type=lora["quantize"], compress_statistics=lora.get("double_quant", True))
                q.weight = bnb.nn.Params4bit(w.to(compute), requires_grad=False, quant_type=lora["quantize"],
                                             compress_statistics=lora.get("double_quant", True))
            setattr(parent, name.rsplit(".", 1)[-1], q.to("cpu"))


def setup(cfg):
    """measure_torch.setup, with LoRA's "bf16" (base cast before wrapping, fp32 adapters,
    no autocast) handed to it as a run without casts."""
    if cfg.get("lora") and cfg["train"]["precision"] == "bf16":
        cfg = dict(cfg, train=dict(cfg["train"], precision="fp32"), base_bf16=True)
    return _setup(cfg)


_setup = mt.setup


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/data/torch_lora.json")
    ap.add_argument("--only", default=None, help="run only configs whose id contains this")
    ap.add_argument("--list", action="store_true", help="list run ids and exit")
    args = ap.parse_args()

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import peft
    import transformers

    transformers.logging.set_verbosity_error()
    mt.build_model = build_model
    mt.setup = setup
    cfgs = configs()
    if args.only:
        cfgs = [c for c in cfgs if args.only in c["id"]]
    if args.list:
        for c in cfgs:
            print(c["id"])
        return
    old = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            old = {r["id"]: r for r in json.load(f).get("runs", [])}
    for cfg in cfgs:
        if cfg["id"] in old and not args.only:
            continue  # measured already: --only ID re-measures
        r = mt.measure(cfg)
        r["config"] = {k: cfg[k] for k in ("model", "train", "hardware", "lora") if k in cfg}
        r["hf_config"] = cfg["hf"]
        # Each run records the versions it was measured with (the header's are the
        # first runs').
        r["versions"] = {"transformers": transformers.__version__, "peft": peft.__version__}
        if cfg.get("lora", {}).get("quantize", "none") != "none":
            import bitsandbytes

            r["versions"]["bitsandbytes"] = bitsandbytes.__version__
        old[r["id"]] = r
        print(f"{r['id']:<90} peak {r['peak_bytes'] / 2**20:8.2f} MiB  near {r['peak_near_op']}  [{r['seconds']} s]",
              flush=True)
        write(args.out, old, peft.__version__, transformers.__version__)


def write(path, runs, peft_version, transformers_version):
    order = [c["id"] for c in configs()]
    rows = sorted((r for r in runs.values() if r["id"] in order), key=lambda r: order.index(r["id"]))
    header = {"torch": torch.__version__.split("+")[0], "transformers": transformers_version,
              "peft": peft_version}
    if os.path.exists(path):
        with open(path) as f:
            header = json.load(f).get("tool", header)
    out = {
        "tool": header,
        "method": "tools/measure_torch.py's measurement (one steady-state step after a warm-up, "
                  "torch.profiler memory timeline, peak over all categories) of transformers' classes "
                  "built from tests/data/hf_configs/*.json at reduced sizes (hf_config records each), "
                  "PEFT LoRA as described in tools/measure_lora.py",
        "runs": rows,
    }
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
