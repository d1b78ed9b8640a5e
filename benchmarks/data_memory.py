"""RSS of rlkit's prompt table (Python lists) for N prompts vs a datasets.Dataset (Arrow, memory-mapped).

    python benchmarks/data_memory.py 100000 lists      # rlkit: load_prompts + tokenize_rows (grpo_gsm8k.yaml data)
    python benchmarks/data_memory.py 100000 datasets   # load_dataset("json") + batched .map(tokenize), cached

N rows are GSM8K train rows (../shared) repeated; the tokenizer is ../shared's Qwen3.  Results: docs/architecture.md.
"""
import json, os, sys, tempfile, time
N = int(sys.argv[1]); mode = sys.argv[2]
OUT = os.environ.get("OUT_DIR") or tempfile.mkdtemp()
src = "/work/shared/data/gsm8k/train.jsonl"
path = os.path.join(OUT, f"gsm8k_{N}.jsonl")
if not os.path.exists(path):
    rows = [json.loads(l) for l in open(src)]
    with open(path, "w") as f:
        for i in range(N):
            f.write(json.dumps(rows[i % len(rows)]) + "\n")
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
from transformers import AutoTokenizer
from rlkit.config import load_config
from rlkit import data as D
tok = AutoTokenizer.from_pretrained("/work/shared/tokenizers/qwen3")
cfg = load_config(["recipe=recipes/grpo_gsm8k.yaml", f"data.path={path}", "model.name_or_path=toy:tiny"], validate=False)
import gc; gc.collect()
r0 = rss(); t0 = time.perf_counter()
if mode == "lists":
    rows = D.load_prompts(cfg.data, None, "train")
    r1 = rss(); t1 = time.perf_counter()
    rows = D.tokenize_rows(rows, cfg.data, tok)
    r2 = rss(); t2 = time.perf_counter()
    print(f"lists N={N}: load {r1-r0:.0f} MiB {t1-t0:.1f}s; +prompt_ids {r2-r1:.0f} MiB {t2-t1:.1f}s; total {r2-r0:.0f} MiB")
else:
    import datasets
    datasets.disable_progress_bars()
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=os.path.join(OUT, "cache"))
    r1 = rss(); t1 = time.perf_counter()
    ds = ds.map(lambda b: {"prompt_ids": tok(b["question"])["input_ids"]}, batched=True)
    r2 = rss(); t2 = time.perf_counter()
    print(f"datasets N={N}: load {r1-r0:.0f} MiB {t1-t0:.1f}s; +map prompt_ids {r2-r1:.0f} MiB {t2-t1:.1f}s; total {r2-r0:.0f} MiB")
