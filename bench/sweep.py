"""Hyperparameter sweep for stage 4, selected on validation only: run several flag sets in parallel, print a table of
validation NDCG@10 / HR@10 at each run's best epoch, best first. Test metrics are not printed: choosing defaults by
test would make every later test figure optimistic (results.json still holds them for the run you keep).

    python bench/sweep.py DATA --jobs 12 --base "--device cuda --loss ce" "--dropout 0.3" "--dropout 0.4" "--hidden 128"
    python bench/sweep.py DATA --jobs 2 --base "--threads 1" --time-limit 3000 "" "--lr 2e-3"      (on 2 CPU cores)

Each positional argument is one run's extra flags ("" = the defaults). Runs are named sweep_<tag>_<flags> (the --base flags are not in the name: use --tag); a finished
run (results.json present) is reused. With --time-limit, runs still going after that many seconds get SIGTERM, which
makes stage 4 stop after the current epoch and test its best epoch so far (the table marks them); runs not started by
then are skipped.
"""
import argparse
import importlib
import json
import re
import shlex
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from ablation import run_all  # noqa: E402  (one runner of stage scripts: nice, log file, parallel, deadline)

stage4 = importlib.import_module("04_train_backbone")


def slug(flags: str) -> str:
    s = re.sub(r"[^A-Za-z0-9.]+", "_", flags.replace("--", "")).strip("_")
    return s or "defaults"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="dataset directory")
    p.add_argument("runs", nargs="+", help="one quoted string of stage-4 flags per run")
    p.add_argument("--base", default="", help="flags given to every run (quoted)")
    p.add_argument("--tag", default="", help="prefix of the run names")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--time-limit", type=float, default=0, help="SIGTERM runs still going after this many seconds")
    a = p.parse_args()

    data = Path(a.data)
    names = {f: f"sweep_{a.tag + '_' if a.tag else ''}{slug(f)}" for f in a.runs}
    logs = data / "runs" / "_sweep_logs"
    todo = [(["04_train_backbone.py", str(data), *shlex.split(a.base), *shlex.split(f), "--name", names[f]],
             logs / f"{names[f]}.log") for f in a.runs if not (data / "runs" / names[f] / "results.json").is_file()]
    # a failed run is reported in the table, not fatal: the others are still worth reading
    run_all(todo, a.jobs, check=False, deadline=time.time() + a.time_limit if a.time_limit else 0.0)

    rows = []
    for f, n in names.items():
        path = data / "runs" / n / "results.json"
        if not path.is_file():
            rows.append((-1.0, f"| `{f or 'defaults'}` | (no result: see {logs / (n + '.log')}) | | | | | | |"))
            continue
        r = json.loads(path.read_text())
        v = r["valid"]["full"]
        sel = stage4.SELECT[r["config"].get("select", "full")]  # what the run selected on (runs before --select: full)
        stopped = f"SIGTERM at {r['epochs_run']}" if r.get("interrupted_by") else str(r["epochs_run"])
        rows.append((r["valid"][sel]["NDCG@10"], f"| `{f or 'defaults'}` | {sel} | {v['NDCG@10']:.4f} | "
                                                 f"{v['HR@10']:.4f} | {r['valid']['sampled100']['NDCG@10']:.4f} | "
                                                 f"{r['valid']['sampled100']['HR@10']:.4f} | {r['best_epoch']} / "
                                                 f"{stopped} | {r['train_seconds'] / 60:.1f} |"))
    print(f"\n{data}: base flags `{a.base or 'none'}`; validation metrics at each run's best epoch, sorted by the "
          f"NDCG@10 of the protocol each run selected on; test metrics deliberately not shown\n")
    print("| flags | selected on | valid NDCG@10 | valid HR@10 | valid sampled-100 NDCG@10 | valid sampled-100 HR@10 "
          "| best epoch / epochs | train min |")
    print("|---|---|---|---|---|---|---|---|")
    for _, line in sorted(rows, key=lambda x: -x[0]):
        print(line)


if __name__ == "__main__":
    main()
