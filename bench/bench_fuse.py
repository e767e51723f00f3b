"""Benchmark stage 3's pre-training step: where the time goes, against the arithmetic floor, in one run.

    python bench/bench_fuse.py data/beauty                 # needs DATA/semantics.pt and DATA/aligned.pt
    python bench/bench_fuse.py data/beauty --steps 30 --threads 2

Builds the fusion module and its pre-training heads exactly as `03_fuse.py` does (same Config defaults, the real
consecutive training pairs in the stage's batch order), then times optimisation steps of two variants:
  one pass   every distinct item of the batch fused at the full 32-token width (the computation before length groups)
  groups     items fused in four groups of similar text length (the stage's default; same outputs, tested)
For each: ms per step and the projected wall time of the whole stage (steps per epoch x epochs), and for the default a
torch.profiler split of the step into matmuls (forward and backward), attention, normalisation and activations,
gathers and copies, the loss, the optimiser and the rest. The floor is the step's FLOPs (torch's FlopCounterMode,
forward + backward) / the rate of a 2048^2 float32 matmul measured here with the same threads: what the step would take
if every matmul ran at the large-matmul rate and everything else were free.
"""
import argparse
import importlib
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
fuse = importlib.import_module("03_fuse")
import common  # noqa: E402

GROUPS = [  # profiler op name fragments -> what the time is spent on (first match wins)
    ("matmul", ("::mm", "addmm", "bmm", "matmul", "linear")),
    ("loss", ("cross_entropy", "nll", "log_softmax", "vector_norm")),
    ("attention", ("attention", "softmax", "_efficient", "flash")),
    ("norm + activation + dropout", ("layer_norm", "gelu", "dropout", "bernoulli")),
    ("gather / copy / mask", ("index", "gather", "copy_", "to_copy", "cat", "where", "masked", "unique", "sort",
                              "nonzero", "clone", "contiguous", "slice", "select")),
    ("optimiser", ("adam", "_foreach", "lerp", "addcdiv", "sqrt", "zero_")),
]


def matmul_rate(n=2048, reps=10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def group_of(name: str) -> str:
    name = name.lower()
    for g, keys in GROUPS:
        if any(k in name for k in keys):
            return g
    return "other (elementwise, autograd)"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per variant (after 3 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}; load average at start {os.getloadavg()[0]:.2f}")
    data = Path(args.data)
    cfg = fuse.Config(data=str(data))
    ds = common.load_dataset(data, check_images=False)
    sem = common.load_artifact(data / "semantics.pt", "semantics", fingerprint=ds.fingerprint, item_ids=ds.item_ids)
    al = common.load_artifact(data / "aligned.pt", "aligned", fingerprint=ds.fingerprint, item_ids=ds.item_ids)
    inputs = [al["aligned"].float(), al["view_mask"].bool(), sem["text_tokens"], sem["text_mask"].bool()]
    train, _ = ds.split()
    pairs = torch.from_numpy(fuse.training_pairs(train))
    steps_per_epoch = -(-len(pairs) // cfg.batch)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed))
    batches = [pairs[order[s:s + cfg.batch]] for s in range(0, (args.steps + 3) * cfg.batch, cfg.batch)]
    print(f"{ds.n_items:,} items, {len(pairs):,} training pairs: {steps_per_epoch} steps/epoch x {cfg.epochs} epochs; "
          f"fine tokens {tuple(inputs[2].shape)}, real tokens per item {inputs[3].sum(1).float().mean():.1f}")
    rate = matmul_rate()
    print(f"2048^2 float32 matmul: {rate / 1e9:.1f} GFLOP/s")

    torch.manual_seed(cfg.seed)
    model = fuse.Pretrainer(fuse.BiCrossFusion(inputs[0].shape[-1], inputs[2].shape[-1], d=cfg.d, heads=cfg.heads,
                                               n_views=inputs[0].shape[1], dropout=cfg.dropout), cfg.d).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(b, groups):
        fwd = model.fusion.forward
        model.fusion.forward = lambda *a: fwd(*a, groups=groups)
        try:
            loss, _, _ = model.loss(inputs, b[:, 0], b[:, 1], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        finally:
            del model.fusion.forward

    with FlopCounterMode(display=False) as fc:
        step(batches[0], 4)
    flops = fc.get_total_flops()
    items = float(np.mean([len(torch.unique(b)) for b in batches]))
    print(f"distinct items per batch {items:.0f}; FLOPs per step (forward + backward, matmuls) {flops / 1e9:.2f} G")
    floor_ms = flops / rate * 1e3
    rows = []
    for name, groups in [("one pass", 1), ("groups", 4)]:
        for b in batches[:3]:
            step(b, groups)
        t = time.perf_counter()
        for b in batches[3:]:
            step(b, groups)
        ms = (time.perf_counter() - t) / args.steps * 1e3
        rows.append((name, ms))
    print("\n| variant | ms/step | projected stage 3 (min) | floor share |\n| --- | --- | --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.0f} | {ms * steps_per_epoch * cfg.epochs / 6e4:.1f} | {floor_ms / ms:.0%} |")
    print(f"| floor (FLOPs / matmul rate) | {floor_ms:.0f} | {floor_ms * steps_per_epoch * cfg.epochs / 6e4:.1f} | "
          f"100% |")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for b in batches[3:3 + min(args.steps, 10)]:
            step(b, 4)
    spent = defaultdict(float)
    for e in prof.key_averages():
        spent[group_of(e.key)] += e.self_cpu_time_total
    total = sum(spent.values())
    print("\nwhere a default step's time goes (profiler self CPU time):")
    for g, us in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {g:30s} {us / total:6.1%}")
    print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
