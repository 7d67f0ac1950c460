#!/usr/bin/env python3
"""Host memory (RSS) of the pieces of a training process, measured on CPU.

Usage:
    python tools/measure_host.py [--out tests/data/host_rss.json]

Every case runs in a fresh interpreter and reads its own /proc/self/status: VmRSS
(resident now), VmHWM (the resident high-water mark), RssAnon (private heap) and
RssFile (file-backed pages, e.g. a memory-mapped safetensors file: shared between
processes through the page cache and reclaimable). Cases:

  python          `python -c pass`: the interpreter alone.
  import_torch    `import torch` (the CPU side of the CUDA build; CUDA is not
                  initialised: that needs a GPU and is not measured here).
  import_transformers
                  torch + transformers' model classes.
  load_*          `from_pretrained` of a model saved beforehand with random weights
                  (safetensors, fp32 on disk, no download), RSS after the load minus RSS
                  before it; `dtype` as the case says. The T5 shape is ChatLM-mini-Chinese's
                  (presets/models/chatlm-mini-chinese.toml), the llama shape SmolLM2-135M's.
  init_*          the model built from its config on CPU (random init, fp32), RSS after minus
                  before: what a run that trains from scratch holds before `.to("cuda")`.
  tokenizer_*     `tokenizers.Tokenizer.from_file` of a byte-level BPE tokenizer.json with
                  V entries and V - 256 merges, built here (no download), RSS after minus
                  before.
  worker          a DataLoader worker (num_workers = 2, fork): each worker's unique set
                  size (USS, pages only it holds) after it has produced 20 batches.

Runs on torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3 (CPU). The numbers feed
planner/src/host.rs; tests compare its constants with this file.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

STATUS = r"""
def status():
    out = {}
    for line in open('/proc/self/status'):
        k, _, v = line.partition(':')
        if k in ('VmRSS', 'VmHWM', 'RssAnon', 'RssFile'):
            out[k] = int(v.split()[0]) * 1024
    return out
"""


def run(code):
    """Runs `code` in a fresh interpreter; it prints one JSON object last."""
    p = subprocess.run([sys.executable, "-c", STATUS + code], capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def save_models(tmp):
    code = f"""
import torch, transformers
torch.manual_seed(0)
t5 = transformers.T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=10, num_decoder_layers=10,
    num_heads=12, vocab_size=29298, feed_forward_proj='relu', tie_word_embeddings=True)
transformers.T5ForConditionalGeneration(t5).save_pretrained({tmp!r} + '/t5')
ll = transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
transformers.LlamaForCausalLM(ll).save_pretrained({tmp!r} + '/llama')
import json, os
sizes = {{k: os.path.getsize({tmp!r} + '/' + k + '/model.safetensors') for k in ('t5', 'llama')}}
print(json.dumps(sizes))
"""
    return run(code)


def load(tmp, kind, dtype):
    cls = "T5ForConditionalGeneration" if kind == "t5" else "LlamaForCausalLM"
    code = f"""
import json, torch, transformers
before = status()
m = transformers.{cls}.from_pretrained({tmp!r} + '/{kind}', dtype={dtype})
after = status()
n = sum(p.numel() for p in m.parameters())
b = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({{'before': before, 'after': after, 'params': n, 'param_bytes': b}}))
"""
    r = run(code)
    r["rss_delta"] = r["after"]["VmRSS"] - r["before"]["VmRSS"]
    r["anon_delta"] = r["after"]["RssAnon"] - r["before"]["RssAnon"]
    r["file_delta"] = r["after"]["RssFile"] - r["before"]["RssFile"]
    r["hwm_delta"] = r["after"]["VmHWM"] - r["before"]["VmRSS"]
    return r


def init(kind):
    if kind == "t5":
        cfg = ("T5Config(d_model=768, d_kv=64, d_ff=3072, num_layers=10, num_decoder_layers=10, "
               "num_heads=12, vocab_size=29298, feed_forward_proj='relu', tie_word_embeddings=True)")
        cls = "T5ForConditionalGeneration"
    else:
        cfg = ("LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, "
               "num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)")
        cls = "LlamaForCausalLM"
    code = f"""
import json, torch, transformers
cfg = transformers.{cfg}
before = status()
m = transformers.{cls}(cfg)
after = status()
b = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({{'before': before, 'after': after, 'param_bytes': b}}))
"""
    r = run(code)
    r["rss_delta"] = r["after"]["VmRSS"] - r["before"]["VmRSS"]
    r["anon_delta"] = r["after"]["RssAnon"] - r["before"]["RssAnon"]
    return r


def tokenizer(tmp, vocab):
    path = f"{tmp}/tok{vocab}.json"
    code = f"""
import json, random
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
random.seed(0)
base = pre_tokenizers.ByteLevel.alphabet()
vocab = {{t: i for i, t in enumerate(sorted(base))}}
toks = list(vocab)
merges = []
while len(vocab) < {vocab}:
    a, b = random.choice(toks), random.choice(toks)
    if len(a) + len(b) > 12 or (a + b) in vocab:
        continue
    vocab[a + b] = len(vocab); toks.append(a + b); merges.append((a, b))
tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tk.decoder = decoders.ByteLevel()
tk.save({path!r})
print(json.dumps({{'merges': len(merges)}}))
"""
    run(code)
    code = f"""
import json, os
from tokenizers import Tokenizer
before = status()
t = Tokenizer.from_file({path!r})
t.encode('hello world ' * 100)
after = status()
print(json.dumps({{'before': before, 'after': after, 'file_bytes': os.path.getsize({path!r})}}))
"""
    r = run(code)
    r["rss_delta"] = r["after"]["VmRSS"] - r["before"]["VmRSS"]
    return r


WORKER = """
import json, psutil, torch
class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 10_000
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 29298, (192,), generator=g)
        return {'input_ids': ids, 'labels': ids.clone()}
dl = torch.utils.data.DataLoader(Tokens(), batch_size=32, num_workers=2, prefetch_factor=2,
                                 multiprocessing_context='fork')
it = iter(dl)
for _ in range(20):
    next(it)
me = psutil.Process()
kids = me.children()
out = {'parent_uss': me.memory_full_info().uss,
       'workers_uss': [k.memory_full_info().uss for k in kids],
       'workers_rss': [k.memory_info().rss for k in kids]}
print(json.dumps(out))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data/host_rss.json")
    a = ap.parse_args()
    res = {"torch": None, "transformers": None, "tokenizers": None, "cases": {}}
    v = run("import json, torch, transformers, tokenizers; print(json.dumps([torch.__version__, transformers.__version__, tokenizers.__version__]))")
    res["torch"], res["transformers"], res["tokenizers"] = v
    c = res["cases"]
    c["python"] = run("import json; print(json.dumps(status()))")
    c["import_torch"] = run("import json, torch; print(json.dumps(status()))")
    c["import_transformers"] = run(
        "import json, torch, transformers; transformers.LlamaForCausalLM; transformers.T5ForConditionalGeneration; print(json.dumps(status()))"
    )
    with tempfile.TemporaryDirectory() as tmp:
        res["safetensors_bytes"] = save_models(tmp)
        for kind in ("t5", "llama"):
            for dtype in ("torch.float32", "torch.bfloat16"):
                name = f"load_{kind}_{dtype.split('.')[1]}"
                c[name] = load(tmp, kind, dtype)
                print(name, c[name]["rss_delta"] / 2**20, "MiB", file=sys.stderr)
        for kind in ("t5", "llama"):
            c[f"init_{kind}"] = init(kind)
            print("init", kind, c[f"init_{kind}"]["rss_delta"] / 2**20, "MiB", file=sys.stderr)
        for vocab in (29298, 49152, 151643):
            c[f"tokenizer_{vocab}"] = tokenizer(tmp, vocab)
            print(vocab, c[f"tokenizer_{vocab}"]["rss_delta"] / 2**20, "MiB", file=sys.stderr)
    c["worker"] = run(WORKER)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps({k: (v.get("VmRSS") if "VmRSS" in v else v.get("rss_delta")) for k, v in c.items() if isinstance(v, dict)}, indent=1))


if __name__ == "__main__":
    main()
