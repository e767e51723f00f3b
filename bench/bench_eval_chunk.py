"""Full-ranking evaluation at catalogue scale: users/second and peak memory with item chunking (--eval-chunk) against
the unchunked path, in one run, on a synthetic catalogue of 1M items.

    python bench/bench_eval_chunk.py [--items 1000000] [--both-fit 100000] [--chunk 16384] [--users 2048]

The catalogue is random item vectors (ranking cost does not depend on what the vectors mean), scored by
04_train_backbone.full_ranks, the function evaluation uses. Each measurement runs in its own subprocess so its peak
resident memory is its own; the unchunked path materialises users x items scores, so it is compared with the chunked
one on --both-fit items, where both fit, and the chunked path alone runs on the full catalogue.
"""
import argparse
import importlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def measure(items, chunk, users, batch, d, threads):
    """Run in the subprocess: rank `users` targets against `items` random items; print JSON."""
    sys.path.insert(0, str(ROOT))
    stage4 = importlib.import_module("04_train_backbone")
    if threads:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(items, d, generator=g)
    h = torch.randn(users, d, generator=g)
    target = torch.randint(1, items + 1, (users,), generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    stage4.full_ranks(h[:8], table, target[:8], chunk)  # warm-up
    t0 = time.perf_counter()
    ranks = torch.cat([stage4.full_ranks(h[b:b + batch], table, target[b:b + batch], chunk)
                       for b in range(0, users, batch)])
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"users_per_s": users / dt, "peak_mb": peak, "table_mb": table.numel() * 4 / 2 ** 20,
                      "before_mb": base, "rank_sum": int(ranks.sum())}))


def run(items, chunk, args):
    out = subprocess.run([sys.executable, __file__, "--one", "--items", str(items), "--chunk", str(chunk),
                          "--users", str(args.users), "--batch", str(args.batch), "--dim", str(args.dim),
                          "--threads", str(args.threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue size of the chunked run")
    p.add_argument("--both-fit", type=int, default=100_000, help="catalogue size for the chunked vs unchunked ratio")
    p.add_argument("--chunk", type=int, default=16384, help="items per chunk")
    p.add_argument("--users", type=int, default=2048, help="users ranked per measurement")
    p.add_argument("--batch", type=int, default=1024, help="users per evaluation batch")
    p.add_argument("--dim", type=int, default=64, help="vector size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        return measure(a.items, a.chunk, a.users, a.batch, a.dim, a.threads)
    print(f"torch {torch.__version__}, {a.threads or torch.get_num_threads()} threads; {a.users} users in batches of "
          f"{a.batch}, d={a.dim}")
    full = run(a.both_fit, 0, a)
    chunked = run(a.both_fit, a.chunk, a)
    assert full["rank_sum"] == chunked["rank_sum"], "chunked ranks differ from unchunked ones"
    for name, r in (("unchunked", full), (f"chunk {a.chunk}", chunked)):
        print(f"{a.both_fit:>9,} items {name:>12s}: {r['users_per_s']:8.0f} users/s, peak {r['peak_mb']:6.0f} MB "
              f"(item table {r['table_mb']:.0f} MB)")
    print(f"  chunked / unchunked: speed {chunked['users_per_s'] / full['users_per_s']:.2f}x, "
          f"peak memory {chunked['peak_mb'] / full['peak_mb']:.2f}x (identical ranks)")
    big = run(a.items, a.chunk, a)
    print(f"{a.items:>9,} items {'chunk ' + str(a.chunk):>12s}: {big['users_per_s']:8.0f} users/s, peak "
          f"{big['peak_mb']:6.0f} MB (item table {big['table_mb']:.0f} MB; unchunked would hold "
          f"{a.batch * a.items * 4 / 2 ** 30:.1f} GB of scores per batch)")


if __name__ == "__main__":
    main()
