"""Stage-4 speed in one run: training sequences/second, full-ranking evaluation users/second and peak memory for each
backbone, and the speed ratio of the SDPA attention path against the plain masked-softmax path on the same batches.

    python bench/bench_backbone.py data/beauty [--batches 40] [--threads 0]
    python bench/bench_backbone.py data/beauty --device cuda        (adds bf16-autocast rows; times are wall + sync)

Each backbone trains --batches batches of one epoch through 04_train_backbone.py itself (a subprocess per backbone,
so the peak resident memory is that run's own), then evaluates every validation user; the figures are read from its
results.json. The SDPA/plain ratio times SASRec forward + backward (ce) in-process on the same model and batches,
alternating the two paths so machine load hits both alike. Figures depend on the machine and on its load: the
printout says how many cores torch used. On a GPU the in-process timings are wall seconds after a synchronize (CPU time
would not see the GPU's work).
"""
import argparse
import importlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import common  # noqa: E402

stage4 = importlib.import_module("04_train_backbone")


def clock(device) -> float:
    """CPU seconds of this process on the CPU (other processes' load cancels out); wall seconds after a sync on a GPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return time.process_time()


def run_backbone(data, backbone, loss, batches, threads, device, amp=False, attention="sdpa"):
    name = f"_bench_{backbone}_{loss}_{attention}{'_amp' if amp else ''}"
    cmd = [sys.executable, str(ROOT / "04_train_backbone.py"), data, "--backbone", backbone, "--loss", loss,
           "--views", "id", "--epochs", "1", "--max-batches", str(batches), "--attention", attention,
           "--name", name, "--threads", str(threads), "--device", str(device), *(["--amp"] if amp else [])]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = Path(data) / "runs" / name
    res = json.loads((out / "results.json").read_text())
    shutil.rmtree(out)
    ep = res["curve"][0]
    n_eval = res["dataset"]["report"]["users"]
    return {"seq_per_s": ep["seq_per_s"], "seq_per_cpu_s": ep["seq_per_s"] * ep["train_seconds"] / ep["train_cpu_seconds"],
            "eval_users_per_s": n_eval / ep["eval_seconds"], "peak_mb": res["peak_memory_mb"]}


def sdpa_vs_plain(data, batches, device, full_length=False, amp=False, reps=3):
    """Seconds per batch (see clock) of SASRec's transformer forward + backward (the output layer left out, so the
    figure is the attention's share, not the softmax over items) with each attention path: same weights, same
    batches."""
    ds = common.load_dataset(data, check_images=False)
    train_seqs, _ = ds.split()
    cfg = stage4.Config(data=data)
    tr, lens = stage4.right_aligned(train_seqs, cfg.max_len)
    keep = lens >= 1
    tr, lens = tr[keep], lens[keep]
    torch.manual_seed(0)
    model = stage4.Recommender(cfg, ds.n_items, ["id"], None).to(device)
    order = stage4.batch_order(lens, cfg.batch_size, np.random.default_rng(0), True)[:batches]
    # trimmed batches as training sees them, or all max_len columns (the cost without trimming)
    inputs = [torch.from_numpy(tr[b] if full_length else tr[b][:, -int(lens[b].max()):]).to(device) for b in order]

    def one_pass():
        t0 = clock(device)
        for x in inputs:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                y = model.states(x)
            y.float().square().sum().backward()
            model.zero_grad(set_to_none=True)
        return (clock(device) - t0) / len(inputs)

    times = {"sdpa": [], "plain": []}
    for _ in range(reps):
        for impl in ("sdpa", "plain"):
            for b in model.backbone.blocks:
                b.attention = impl
            times[impl].append(one_pass())
    return {k: float(np.median(v)) for k, v in times.items()}


def ce_vs_cross_entropy(data, device, positions=1150, d=64, reps=5):
    """Milliseconds (see clock) of the ce loss forward + backward on one Beauty-sized step ([positions, d] states
    against every item): stage 4's hand-written SoftmaxCE against F.cross_entropy on the same logits, alternated,
    median of reps."""
    n = common.load_dataset(data, check_images=False).n_items
    g = torch.Generator().manual_seed(0)
    h = torch.randn(positions, d, generator=g).to(device).requires_grad_()
    W = (torch.randn(n, d, generator=g) * d ** -0.5).to(device).requires_grad_()
    y = torch.randint(1, n + 1, (positions,), generator=g).to(device)
    paths = {"SoftmaxCE": lambda: stage4.SoftmaxCE.apply(h, W, y - 1, 0),
             "F.cross_entropy": lambda: torch.nn.functional.cross_entropy(h @ W.T, y - 1, reduction="sum")}
    times = {k: [] for k in paths}
    for _ in range(reps):
        for k, f in paths.items():
            t0 = clock(device)
            f().backward()
            times[k].append(clock(device) - t0)
            h.grad = W.grad = None
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}, n


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="dataset directory (e.g. data/beauty)")
    p.add_argument("--batches", type=int, default=40, help="training batches timed per backbone")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--only-attention", action="store_true", help="skip the per-backbone runs")
    p.add_argument("--device", default="cpu", help="cpu | cuda (on cuda, bf16-autocast rows are added)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = common.pick_device(a.device)
    gpu = device.type == "cuda"
    unit = "wall ms (synchronised)" if gpu else "CPU ms"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device "
          f"{torch.cuda.get_device_name(device) if gpu else 'cpu'}, data {a.data}, {a.batches} batches of 128")
    runs = [("sasrec", "ce", False), ("sasrec", "bce", False), ("gru4rec", "ce", False), ("bert4rec", "ce", False)]
    runs += [("sasrec", "ce", True), ("bert4rec", "ce", True)] if gpu else []
    for backbone, loss, amp in [] if a.only_attention else runs:
        r = run_backbone(a.data, backbone, loss, a.batches, a.threads, device, amp)
        per_cpu = "" if gpu else f" ({r['seq_per_cpu_s']:6.0f} per CPU-second)"
        print(f"{backbone:9s} {loss:4s} {'bf16' if amp else 'fp32'} train {r['seq_per_s']:8.0f} seq/s{per_cpu} | "
              f"eval {r['eval_users_per_s']:8.0f} users/s | peak {r['peak_mb']:6.0f} MB", flush=True)
    t, n = ce_vs_cross_entropy(a.data, device)
    print(f"ce loss forward+backward, 1150 positions x {n} items: {unit} SoftmaxCE {t['SoftmaxCE']:.2f}, "
          f"F.cross_entropy {t['F.cross_entropy']:.2f}; speed-up {t['F.cross_entropy'] / t['SoftmaxCE']:.2f}x")
    for full in (False, True):
        for amp in (False, True) if gpu else (False,):
            t = sdpa_vs_plain(a.data, min(a.batches, 20), device, full, amp)
            print(f"SASRec transformer forward+backward, {'all 50 columns' if full else 'trimmed batches'}"
                  f"{', bf16 autocast' if amp else ''}: {unit} per batch sdpa {t['sdpa'] * 1e3:.2f}, plain "
                  f"{t['plain'] * 1e3:.2f}; SDPA speed-up {t['plain'] / t['sdpa']:.2f}x")


if __name__ == "__main__":
    main()
