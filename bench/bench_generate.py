"""Benchmark the compact stage-1 backend: items/second at batch size 1 versus the default batch size, and peak memory.

    python bench/bench_generate.py data/ml300                 # 32 prompts, batch 1 vs batch 32 (the default)
    python bench/bench_generate.py data/toy --threads 1 --dtype bfloat16

Loads "compact: EfficientNet-Lite0 tags + SmolLM2-135M" once, tags the images of the sampled items (not timed: the same
work at any batch size), then generates the same prompts one at a time and in batches of --batch-size, with the stage's
own generate(). An item is three prompts (P_img, P_txt, P_mm), so items/s = prompts/s / 3. Prints one figure per line
and the ratio, from this one run. Peak memory is the process's peak resident set (and peak CUDA memory on a GPU).
"""
import argparse
import importlib
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
g = importlib.import_module("01_generate_semantics")
from common import load_dataset, pick_device  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="dataset directory")
    p.add_argument("--prompts", type=int, default=g.Config.batch_size, help="prompts timed at each batch size")
    p.add_argument("--batch-size", type=int, default=g.Config.batch_size, help="the batched setting (stage default)")
    p.add_argument("--max-new-tokens", type=int, default=g.Config.max_new_tokens)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--dtype", default="auto", help="auto / bfloat16 / float32 (as in stage 1)")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = pick_device(a.device)
    ds = load_dataset(a.data)
    reqs = g.build_requests(ds, range(ds.n_items), g.VIEWS, "description")
    # the same mix of views as a full run: walk the items, take all their prompts
    reqs = sorted(reqs, key=lambda r: r.row)[:a.prompts]
    reqs.sort(key=lambda r: (g.VIEWS.index(r.view), len(r.prompt)))  # as run_local orders them
    cfg = g.Config(data=a.data, dtype=a.dtype, device=a.device)
    t0 = time.time()
    be = g.CompactBackend(device, a.max_new_tokens, g.Config.top_tags, g.lm_dtype(cfg))
    be.tag_images([r.image for r in reqs if r.image])
    print(f"backend: {be.label} | dtype {g.lm_dtype(cfg)} | threads {torch.get_num_threads()} | device {device}")
    print(f"load + tagging: {time.time() - t0:.1f}s, peak RSS after load {peak_rss_mb():.0f} MB")
    be.generate(reqs[:2])  # warm-up

    def timed(bs):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        for s in range(0, len(reqs), bs):
            chunk = [r for r in reqs[s:s + bs] if r.view == reqs[s].view]  # batches stay within one view
            rest = [r for r in reqs[s:s + bs] if r.view != reqs[s].view]
            be.generate(chunk)
            if rest:
                be.generate(rest)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.time() - t
        cuda = f", peak CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MB" if device.type == "cuda" else ""
        print(f"batch {bs:>3}: {len(reqs)} prompts in {dt:.1f}s = {len(reqs) / dt:.2f} prompts/s = "
              f"{len(reqs) / dt / 3:.3f} items/s | peak RSS so far {peak_rss_mb():.0f} MB{cuda}")
        return len(reqs) / dt

    r1 = timed(1)
    rb = timed(a.batch_size)
    print(f"ratio batch {a.batch_size} / batch 1: {rb / r1:.2f}x ({a.max_new_tokens} new tokens, greedy)")


if __name__ == "__main__":
    main()
