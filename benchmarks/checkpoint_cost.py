"""Cost of checkpoint integrity: a full ``save_checkpoint`` on the toy model vs. the share spent on the manifest
(sha256 of every file + fsync of files and directories), ``verify`` (what ``resume`` checks), and sha256
throughput on a large buffer to extrapolate to real models.

    python benchmarks/checkpoint_cost.py [--repeats 10] [--size tiny] [--mb 512]

CPU seconds (process time) are reported next to wall seconds: the wall clock is noisy on a shared machine."""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--size", default="tiny", help="rlkit.toy size (toy:<size>)")
    ap.add_argument("--mb", type=int, default=512, help="buffer for the sha256 throughput")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from rlkit import checkpoint as ckpt
    from rlkit.config import load_config
    from rlkit.toy import echo_rows
    from rlkit.trainer import Trainer

    out = tempfile.mkdtemp()
    cfg = load_config([f"model.name_or_path=toy:{a.size}", "data.prompt_field=question", "data.answer_field=answer",
                       "rollout.samples_per_prompt=4", "rollout.max_new_tokens=6", "trainer.prompts_per_step=4",
                       f"trainer.output_dir={out}", "trainer.progress_bar=false", "trainer.log_with=[]",
                       "trainer.keep_checkpoints=1", "data.max_prompt_tokens=32", "reward.functions=[rewards/toy.py:echo]"])
    tr = Trainer(cfg, train_rows=echo_rows(64, seed=0))
    tr.step()
    orig = ckpt.write_manifest
    man = []

    def timed(*args):
        t0, c0 = time.perf_counter(), time.process_time()
        r = orig(*args)
        man.append((time.perf_counter() - t0, time.process_time() - c0))
        return r

    ckpt.write_manifest = timed
    save, ver = [], []
    for _ in range(a.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        p = tr.save_checkpoint()
        save.append((time.perf_counter() - t0, time.process_time() - c0))
        t0, c0 = time.perf_counter(), time.process_time()
        ckpt.verify(p, 1)
        ver.append((time.perf_counter() - t0, time.process_time() - c0))
        tr.step_idx += 1
    size = ckpt.dir_size(p)
    buf = os.urandom(a.mb << 20)
    t0 = time.process_time()
    hashlib.sha256(buf).hexdigest()
    sha = a.mb / (time.process_time() - t0)  # CPU seconds: hashing is CPU-bound
    med = lambda xs, i: statistics.median(x[i] for x in xs)  # noqa: E731
    print(f"torch {torch.__version__}, 1 thread, toy:{a.size}, checkpoint {size / 2**20:.2f} MiB, {a.repeats} saves, medians:")
    print(f"  save_checkpoint   wall {med(save, 0) * 1e3:7.1f} ms   cpu {med(save, 1) * 1e3:7.1f} ms")
    print(f"  of which manifest wall {med(man, 0) * 1e3:7.1f} ms   cpu {med(man, 1) * 1e3:7.1f} ms "
          f"({100 * med(man, 0) / med(save, 0):.0f}% of the save, sha256 + fsync)")
    print(f"  verify (resume)   wall {med(ver, 0) * 1e3:7.1f} ms   cpu {med(ver, 1) * 1e3:7.1f} ms")
    print(f"  sha256 throughput {sha:.0f} MiB/s per CPU second: a 7B model's bf16 weights + fp32 Adam state "
          f"(~14 + 2x28 + 28 GB = ~98 GB) hash in ~{98e3 / sha / 60:.1f} min single-threaded")


if __name__ == "__main__":
    main()
