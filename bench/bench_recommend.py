"""Recommending for every user vs evaluating every user: users per second of the same trained run, same process.

    python bench/bench_recommend.py DATA RUN [--k 10] [--threads 1] [--repeats 3]

Loads DATA/runs/<RUN>/model.pt once; then, alternating (so machine load hits both alike), times stage 4's evaluate()
on every evaluation user's test history (full ranking + sampled-100, what each validation epoch does) and top_k() on
every user's whole history (scores over all items, seen items excluded, top k). Prints the best of --repeats for each,
their ratio, and the evaluation users/s that the training run itself logged (results.json) for reference.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
stage4 = importlib.import_module("04_train_backbone")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data")
    p.add_argument("run")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, cfg, ds = stage4.load_trained(a.data, a.run, "cpu")
    bert = cfg.backbone == "bert4rec"
    _, eval_users = ds.split()
    hist, _ = stage4.right_aligned([ds.seqs[u][:-1] for u in eval_users], cfg.max_len - 1 if bert else cfg.max_len)
    target = np.array([ds.seqs[u][-1] for u in eval_users], dtype=np.int64)
    negs = stage4.sample_eval_negatives([ds.seqs[u] for u in eval_users], ds.n_items, cfg.n_neg, cfg.eval_seed)
    ev, rec = [], []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        stage4.evaluate(model, hist, target, negs, cfg, torch.device("cpu"), bert)
        ev.append(len(eval_users) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        stage4.top_k(model, cfg, ds.seqs, a.k, batch=cfg.eval_batch)
        rec.append(ds.n_users / (time.perf_counter() - t0))
    res = json.loads((Path(a.data) / "runs" / a.run / "results.json").read_text())
    logged = [len(eval_users) / r["eval_seconds"] for r in res["curve"] if "eval_seconds" in r]
    print(f"{a.data} run {a.run} ({cfg.backbone}, views {res.get('views')}, {ds.n_users} users, {ds.n_items} items), "
          f"{a.threads} thread(s), batches of {cfg.eval_batch}, best of {a.repeats}:")
    print(f"  evaluate (full + sampled-100 ranks, {len(eval_users)} users): {max(ev):,.0f} users/s "
          f"(all: {', '.join(f'{x:,.0f}' for x in ev)})")
    print(f"  recommend top-{a.k}, seen excluded ({ds.n_users} users): {max(rec):,.0f} users/s "
          f"(all: {', '.join(f'{x:,.0f}' for x in rec)})")
    print(f"  recommend / evaluate: {max(rec) / max(ev):.2f}x; the training run logged evaluation at "
          f"{', '.join(f'{x:,.0f}' for x in logged)} users/s")


if __name__ == "__main__":
    main()
