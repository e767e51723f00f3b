"""What resumability costs: the size of stage 4's last.pt and the time to write it, against one training epoch.

    python bench/bench_checkpoint.py [--data bench/out/beauty] [--threads 1] [--reps 5]

Builds Amazon Beauty with data/prepare.py when --data does not exist yet, trains SASRec-ce with the defaults for one
full epoch through 04_train_backbone.py (which writes last.pt once, at the end of the epoch), then writes that same
checkpoint --reps more times with the writer the run uses (common.save_artifact: torch.save, fsync, atomic rename)
and reports the median. Both figures are wall seconds, so machine load hits them alike.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(ROOT / "bench" / "out" / "beauty"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    data = Path(a.data)
    if not (data / "interactions.csv").is_file():
        subprocess.run([sys.executable, str(ROOT / "data" / "prepare.py"), "beauty", "--out", str(data)], check=True,
                       cwd=ROOT, stdout=subprocess.DEVNULL)
    name = "_bench_checkpoint"
    subprocess.run([sys.executable, str(ROOT / "04_train_backbone.py"), str(data), "--views", "id", "--epochs", "1",
                    "--threads", str(a.threads), "--name", name], check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    run = data / "runs" / name
    epoch = json.loads((run / "results.json").read_text())["curve"][0]
    last = run / "last.pt"
    size = last.stat().st_size
    ck = torch.load(last, weights_only=False)
    meta = ("format_version", "kind", "config", "fingerprint")
    payload = {k: v for k, v in ck.items() if k not in meta}
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        common.save_artifact(run / "bench_last.pt", "resume", payload, ck["config"], ck["fingerprint"])
        times.append(time.perf_counter() - t0)
    write = statistics.median(times)
    params = sum(t.numel() for t in ck["model"].values())
    print(f"Beauty SASRec-ce (hidden {ck['config']['hidden']}, {params:,} parameters), {a.threads} thread(s): "
          f"last.pt {size / 2 ** 20:.1f} MiB, write {write * 1000:.0f} ms (median of {a.reps}; "
          f"{min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms) = {write / epoch['train_seconds']:.2%} of one epoch "
          f"({epoch['train_seconds']:.1f} s training, {epoch['eval_seconds']:.1f} s validation; "
          f"{write / (epoch['train_seconds'] + epoch['eval_seconds']):.2%} of both)")


if __name__ == "__main__":
    main()
