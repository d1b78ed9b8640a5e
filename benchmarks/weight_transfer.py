#!/usr/bin/env python
"""Trainer -> rollout worker weight transfer (``RolloutWorkers.push_weights``, rlkit/rollout/workers.py).

    python benchmarks/weight_transfer.py [--sizes 10,50,125,500] [--dtypes fp32,bf16] [--repeats 3]
                                         [--device auto|cpu|cuda] [--json OUT]

For each size (millions of parameters) and dtype a synthetic model of transformer-like tensors (an embedding, then
blocks of 4 square attention matrices, 3 MLP matrices and 2 norm vectors) is pushed to one local rollout worker
holding a :class:`~rlkit.rollout.workers.WeightSink` stage (it only stores the weights).  One warm-up push, then
``--repeats`` timed pushes, each to an idle worker that holds the previous version (as after a training step); the
table shows the median seconds the trainer is blocked in ``push_weights`` (flatten into one buffer per dtype +
transfer), the resulting GB/s, and ``delivered s``: until the worker reports the version copied into its weights.  After the last push the worker's weights are checked
bit for bit against the trainer's (``weight_checksum``); a mismatch exits 1.  ``memcpy GB/s`` is one in-process copy
of the same bytes (fresh destination) on the trainer's device: the ceiling for any shared-memory transport.

Transports: on CPU, gloo over a stateless TCPStore group.  With a GPU (``--device auto`` picks it) the trainer's
weights live on cuda:0 and two transports are measured: ``cuda_ipc`` (the worker shares the GPU, the default for a
local worker) and ``gloo`` through the CPU (``rollout.worker_device=cpu``).  NCCL is used when the worker is on
another GPU; with one GPU it cannot be measured and the script says so.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synthetic_model(million: float, dtype: torch.dtype, device: str):
    """Named tensors of about ``million`` x 1e6 parameters: hidden h = 1024 up to 2048, vocab 32000 embedding."""
    n = int(million * 1e6)
    h = 1024 if n < 300e6 else 2048
    vocab = min(32000, max(1000, n // (4 * h)))
    per_block = 4 * h * h + 3 * h * (4 * h) // 2 + 2 * h
    blocks = max(1, round((n - vocab * h) / per_block))
    g = torch.Generator(device="cpu").manual_seed(0)
    out = [("embed.weight", torch.randn(vocab, h, generator=g).to(dtype))]
    for b in range(blocks):
        for name in ("q", "k", "v", "o"):
            out.append((f"layers.{b}.attn.{name}.weight", torch.randn(h, h, generator=g).to(dtype)))
        for name, shape in (("up", (2 * h, h)), ("gate", (2 * h, h)), ("down", (h, 2 * h))):
            out.append((f"layers.{b}.mlp.{name}.weight", torch.randn(*shape, generator=g).to(dtype)))
        for name in ("ln1", "ln2"):
            out.append((f"layers.{b}.{name}.weight", torch.randn(h, generator=g).to(dtype)))
    return [(k, v.to(device)) for k, v in out]


def measure(named, worker_device: str, trainer_device: str, repeats: int, transport=None) -> dict:
    from rlkit.config import load_config
    from rlkit.rollout.base import SamplingParams
    from rlkit.rollout.stage import RolloutRequest, weight_checksum
    from rlkit.rollout.workers import RolloutWorkers, WeightSink

    cfg = load_config(["trainer.distributed_timeout_s=600", f"rollout.worker_device={worker_device}"], validate=False)
    specs = [(n, t.shape, t.dtype) for n, t in named]
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    w = RolloutWorkers(cfg, 0, 1, specs, stage_factory=functools.partial(WeightSink, specs), trainer_device=trainer_device,
                       transport=transport)
    try:
        w.push_weights(named, 0)  # warm-up: first connections, allocator
        times, delivered = [], []
        for v in range(1, repeats + 1):
            w.checksum(v - 1)        # the worker is idle and holds v-1 (as after a training step)
            with torch.no_grad():
                named[0][1].add_(1)  # a new version really differs
            t0 = time.perf_counter()
            times.append(w.push_weights(named, v))
            w.checksum(v)            # the worker has copied v into its weights
            delivered.append(time.perf_counter() - t0)
        w.submit(RolloutRequest(1, 0, [], SamplingParams(), None, 0))
        res = w.receive()
        ok = res["version"] == repeats and res["checksum"] == weight_checksum(named)
        backend = w.backend
    finally:
        w.close()
    flat = torch.cat([t.reshape(-1) for _, t in named])
    t0 = time.perf_counter()
    for _ in range(3):
        torch.empty_like(flat).copy_(flat)
    if flat.is_cuda:
        torch.cuda.synchronize()
    memcpy = (time.perf_counter() - t0) / 3
    del flat
    sec = statistics.median(times)
    return {"bytes": nbytes, "transport": backend, "seconds": sec, "seconds_all": times, "gbps": nbytes / sec / 1e9,
            "delivered_s": statistics.median(delivered),
            "memcpy_gbps": nbytes / memcpy / 1e9, "exact": ok}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,50,125,500", help="millions of parameters, comma-separated")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    device = "cuda:0" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(0)
        plans = [("auto", None), ("cpu", "gloo")]   # cuda_ipc (the worker shares cuda:0); gloo through the CPU
        print(f"device: {torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} GPU(s); NCCL (worker on another GPU) "
              f"{'not measured here' if torch.cuda.device_count() < 2 else 'not part of this script'}")
    else:
        plans = [("auto", "shm"), ("auto", "gloo")]
        print(f"device: CPU, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}")
    rows = []
    print(f"{'params':>8} {'dtype':>5} {'GB':>6} {'transport':>10} {'seconds':>8} {'GB/s':>7} {'delivered s':>11} "
          f"{'memcpy GB/s':>11} exact")
    for dname in a.dtypes.split(","):
        for size in [float(s) for s in a.sizes.split(",")]:
            named = synthetic_model(size, DTYPES[dname], device)
            n = sum(t.numel() for _, t in named)
            for worker_device, transport in plans:
                r = measure(named, worker_device, device, a.repeats, transport)
                r.update(params=n, dtype=dname, worker_device=worker_device)
                rows.append(r)
                print(f"{n / 1e6:7.0f}M {dname:>5} {r['bytes'] / 1e9:6.2f} {r['transport']:>10} {r['seconds']:8.3f} "
                      f"{r['gbps']:7.2f} {r['delivered_s']:11.3f} {r['memcpy_gbps']:11.2f} {r['exact']}", flush=True)
            del named
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
