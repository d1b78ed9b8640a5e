"""Cost of the advantage / selection plugins on a realistic synthetic batch (not a test).

    python benchmarks/plugin_overhead.py                       # 64 groups x G=16, responses up to 1024 tokens
    python benchmarks/plugin_overhead.py --groups 8 --repeats 3

Times every advantage estimator (grpo, rloo, tempo, gae with random values) and
selection plugin (d3s_samples, d3s_tokens, dapo_dynamic_sampling) on the same
batch, prints the median wall time and the ratio to plain GRPO, and, for
context, the time of one forward + backward pass of the ``toy:tiny`` policy
(2 layers, hidden 64: far cheaper than any real policy) over the same tokens,
through the trainer's own ``PolicyModule`` in ``trainer.tokens_per_microbatch``
sized micro-batches.  That pass is measured on ``--fwd-rows`` rows and scaled
linearly to the whole batch (its cost is per micro-batch).

Synthetic responses branch like sampled groups do: each response of a group
copies a random earlier response of the group up to a random cut point
(probability ``--share``) and continues with fresh random tokens; lengths are
uniform in [L/2, L], the last token is EOS; rewards are Bernoulli(0.5).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rlkit.batch import Batch  # noqa: E402
from rlkit.registry import ADVANTAGES, FILTERS, TOKEN_WEIGHTING  # noqa: E402

EOS = 2


def synthetic_batch(groups: int, G: int, L: int, share: float, vocab: int, seed: int, deep: bool = False) -> Batch:
    rng = random.Random(seed)
    S = groups * G
    ids = torch.zeros(S, L, dtype=torch.long)
    mask = torch.zeros(S, L)
    for g in range(groups):
        seqs = []
        for j in range(G):
            n = rng.randint(L // 2, L)
            if seqs and rng.random() < share:
                base = rng.choice(seqs)
                cut = rng.randint(len(base) // 2, len(base) - 1) if deep else rng.randint(0, len(base) - 1)
                s = base[:min(cut, n - 1)]
            else:
                s = []
            s = s + [rng.randrange(3, vocab) for _ in range(n - 1 - len(s))] + [EOS]
            seqs.append(s)
            i = g * G + j
            ids[i, :n] = torch.tensor(s)
            mask[i, :n] = 1
    gen = torch.Generator().manual_seed(seed)
    return Batch(prompt_ids=[[1] + [rng.randrange(3, vocab) for _ in range(15)] for _ in range(S)],
                 response_ids=ids, response_mask=mask, group_ids=torch.arange(S) // G,
                 rewards=(torch.rand(S, generator=gen) < 0.5).float(),
                 entropy=torch.rand(S, L, generator=gen) * 3 * mask,
                 values=torch.randn(S, L, generator=gen) * mask, old_values=None,
                 token_weights=torch.ones(S, L))


def fresh(b: Batch) -> Batch:
    return b.select(torch.arange(len(b)))


def bench(fn, make, repeats: int) -> float:
    fn(make())                           # warm-up
    ts = []
    for _ in range(repeats):
        x = make()
        t = time.perf_counter()
        fn(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def toy_forward_backward_ms(b: Batch, rows: int, tokens_per_microbatch: int) -> tuple[float, int]:
    from rlkit.modeling import PolicyModule, build_inputs, load_causal_lm, load_tokenizer

    lm = load_causal_lm("toy:tiny")
    tok = load_tokenizer("toy:tiny")
    V = lm.config.vocab_size
    policy = PolicyModule(lm, tok.pad_token_id, 1024)
    sub = b.select(torch.arange(min(rows, len(b))))
    sub.response_ids = sub.response_ids % (V - 4) + 4
    sub.prompt_ids = [[x % (V - 4) + 4 for x in p] for p in sub.prompt_ids]
    # micro-batches as the trainer packs them (greedy, <= tokens_per_microbatch padded tokens)
    lens = [len(p) + int(n) for p, n in zip(sub.prompt_ids, sub.response_lengths.tolist())]
    micro, cur, mx = [], [], 0
    for i, L in enumerate(lens):
        if cur and max(mx, L) * (len(cur) + 1) > tokens_per_microbatch:
            micro.append(cur)
            cur, mx = [], 0
        cur.append(i)
        mx = max(mx, L)
    micro.append(cur)
    t = time.perf_counter()
    for ids in micro:
        mb = sub.select(ids)
        x, att, (r, p, c) = build_inputs(mb.prompt_ids, mb.response_ids, mb.response_mask, tok.pad_token_id)
        lp, ent, _ = policy(x, att, r, p, c, tuple(mb.response_ids.shape), need_entropy=True)
        (-(lp * mb.response_mask).sum() / mb.response_mask.sum()).backward()
    return (time.perf_counter() - t) * 1e3, len(sub)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=16)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--share", type=float, default=0.8, help="probability that a response copies a prefix of an earlier one")
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--fwd-rows", type=int, default=128, help="rows of the toy forward+backward (scaled to the batch)")
    ap.add_argument("--tokens-per-microbatch", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: OpenMP timings are erratic on a shared, oversubscribed machine)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    b = synthetic_batch(a.groups, a.group_size, a.length, a.share, a.vocab, a.seed)
    deep = synthetic_batch(a.groups, a.group_size, a.length, 1.0, a.vocab, a.seed, deep=True)
    S, ntok = len(b), b.num_tokens
    print(f"batch: {a.groups} groups x G={a.group_size} = {S} responses, up to {a.length} tokens, {ntok} real tokens; "
          f"torch threads {torch.get_num_threads()}")

    adv = {n: ADVANTAGES.get(n)() for n in ("grpo", "rloo", "tempo", "gae")}
    with_adv = fresh(b)
    adv["grpo"](with_adv)
    rows = []

    def run_adv(name, src=b):
        return bench(lambda x: adv[name](x), lambda: fresh(src), a.repeats)

    base = run_adv("grpo")
    rows.append(("advantage grpo", base, ""))
    rows.append(("advantage rloo", run_adv("rloo"), ""))
    t_tempo = run_adv("tempo")
    rows.append(("advantage tempo", t_tempo, f"share={a.share}, cut uniform"))
    rows.append(("advantage tempo (deep sharing)", run_adv("tempo", deep), "every response shares >= half a sibling"))
    rows.append(("advantage gae (random values)", run_adv("gae"), "python loop over T"))
    d3s_s = FILTERS.get("d3s_samples")()
    rows.append(("filter d3s_samples (keep 0.5)", bench(d3s_s, lambda: fresh(with_adv), a.repeats), "cross-group exact search"))
    d3s_g = FILTERS.get("d3s_samples")(FILTERS.get("d3s_samples").Params(scope="group"))
    rows.append(("filter d3s_samples (scope group)", bench(d3s_g, lambda: fresh(with_adv), a.repeats), ""))
    d3s_t = TOKEN_WEIGHTING.get("d3s_tokens")()
    rows.append(("token_weighting d3s_tokens (K 0.2)", bench(d3s_t, lambda: fresh(with_adv), a.repeats), "pooled top-K (O(n) selection)"))
    d3s_ts = TOKEN_WEIGHTING.get("d3s_tokens")(TOKEN_WEIGHTING.get("d3s_tokens").Params(scope="sequence"))
    rows.append(("token_weighting d3s_tokens (per seq)", bench(d3s_ts, lambda: fresh(with_adv), a.repeats), ""))
    dapo = FILTERS.get("dapo_dynamic_sampling")()
    rows.append(("filter dapo_dynamic_sampling", bench(dapo, lambda: fresh(b), a.repeats), ""))

    fb_ms, fb_rows = toy_forward_backward_ms(b, a.fwd_rows, a.tokens_per_microbatch)
    fb_full = fb_ms * S / fb_rows

    w = max(len(r[0]) for r in rows)
    print(f"\n{'plugin':<{w}}  {'ms (median)':>12}  {'x grpo':>8}  notes")
    print("-" * (w + 36))
    for name, ms, note in rows:
        print(f"{name:<{w}}  {ms:>12.1f}  {ms / base:>8.2f}  {note}")
    print("-" * (w + 36))
    print(f"{'toy:tiny policy fwd+bwd, same tokens':<{w}}  {fb_full:>12.1f}  {fb_full / base:>8.1f}  "
          f"measured {fb_ms:.0f} ms on {fb_rows} rows, x{S / fb_rows:g}")
    print(f"\nTEMPO = {100 * t_tempo / fb_full:.3f}% of one toy:tiny (2 layers, hidden 64) forward+backward over the batch; "
          f"TEMPO - GRPO = {t_tempo - base:.1f} ms")


if __name__ == "__main__":
    main()
