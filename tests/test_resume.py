"""Stage 4 loses nothing to a kill: SIGKILL at random points (one of them half-way through writing last.pt), then
`--resume`, gives the results.json of an uninterrupted run with the same seed: identical validation curve, best epoch
and test metrics (CPU; only the wall-clock fields differ). The same under torchrun with 2 ranks (gloo), where SIGTERM
(a scheduler's pre-emption) ends the run after a checkpointed epoch. A checkpoint from another config or dataset is
refused."""
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import ROOT, run_script

stage4 = importlib.import_module("04_train_backbone")

# dropout on (the torch generator matters), bce (the per-epoch negative stream matters), patience short enough that
# early stopping may end the run
ARGS = ["--backbone", "sasrec", "--loss", "bce", "--hidden", "16", "--epochs", "8", "--batch-size", "16",
        "--dropout", "0.3", "--patience", "4", "--views", "id", "--threads", "1"]

# Runs stage 4 as a user would, except that the write of last.pt number STALL (1-based; 0 = none) stops half-way,
# prints PARTIAL and waits to be killed there.
DRIVER = textwrap.dedent("""
    import importlib, os, sys, time
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {root!r} + "/tests")
    import common
    from stalling import StallingFile
    stall, writes, _open = int(os.environ.get("STALL", 0)), [0], open

    def open_(p, mode="r", *a, **k):
        f = _open(p, mode, *a, **k)
        if "w" in mode and os.path.basename(p).startswith(".last.pt.tmp"):
            writes[0] += 1
            if writes[0] == stall:
                return StallingFile(f, 2000, 600)
        return f

    common.open = open_
    common.setup_logging()
    stage4 = importlib.import_module("04_train_backbone")
    stage4.train(common.parse_config(stage4.Config, sys.argv[1:]))
""")
EPOCH_LINE = re.compile(r"epoch\s+(\d+) loss")


def descendants(pid: int) -> list[int]:
    """pid's child processes, recursively (torchrun starts each worker in its own session)."""
    kids = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def launch(cmd, env=None):
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)


def run_until(p, stop_after_epoch: int | None, delay: float, sig=signal.SIGKILL, partial=False) -> str:
    """Read p's log until it reports epoch `stop_after_epoch` (or PARTIAL), wait `delay`, then send `sig`: SIGKILL to
    p and every process under it (a node going away), another signal to p alone (a scheduler; torchrun relays it).
    Returns 'killed' or 'finished' (the run ended first)."""
    try:
        for line in p.stdout:
            m = EPOCH_LINE.search(line)
            if (partial and line.strip() == "PARTIAL") or (not partial and m and int(m[1]) >= stop_after_epoch):
                time.sleep(delay)
                if p.poll() is not None:
                    break
                for pid in [p.pid] + (descendants(p.pid) if sig == signal.SIGKILL else []):
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                p.stdout.read()
                p.wait(timeout=120)
                return "killed"
        p.wait(timeout=120)
        return "finished"
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


def same_run(a: dict, b: dict):
    """Everything a run computes, wall-clock fields aside, is identical."""
    assert [(r["epoch"], r["loss"], r.get("valid")) for r in a["curve"]] == \
           [(r["epoch"], r["loss"], r.get("valid")) for r in b["curve"]]
    assert (a["best_epoch"], a["epochs_run"], a["valid"], a["test"]) == \
           (b["best_epoch"], b["epochs_run"], b["valid"], b["test"])


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(tiny_dataset, tmp_path):
    tiny, rnd = tiny_dataset, random.Random(16)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(root=str(ROOT)))
    run_script("04_train_backbone.py", tiny, *ARGS, "--name", "straight")
    straight = json.loads((tiny / "runs" / "straight" / "results.json").read_text())
    run_dir = tiny / "runs" / "killed"
    cmd = [sys.executable, str(driver), str(tiny), *ARGS, "--name", "killed"]

    # 1. killed half-way through writing the checkpoint of epoch 2: last.pt still holds epoch 1, whole
    p = launch(cmd, {"STALL": "2"})
    assert run_until(p, None, 0.0, partial=True) == "killed"
    assert [x.stat().st_size > 0 for x in run_dir.glob(".last.pt.tmp*")] == [True]
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == 1
    # 2-4. killed at random points (training, evaluation, a checkpoint write), resumed each time; each kill follows
    # the log line of an epoch before the run's last, so that the run is still going
    kills, last_epoch = 1, straight["epochs_run"]
    for _ in range(3):
        ck = torch.load(run_dir / "last.pt", weights_only=False)["epoch"]
        if ck >= last_epoch - 1:
            break
        kills += run_until(launch(cmd + ["--resume"]), rnd.randint(ck + 1, last_epoch - 1), rnd.uniform(0, 0.05)) \
            == "killed"
    assert kills >= 3, f"{kills} kills: the run kept finishing first, the test exercised too little"
    # 5. the last resume runs to the end
    p = launch(cmd + ["--resume"])
    assert run_until(p, 10 ** 9, 0.0) == "finished" and p.returncode == 0
    resumed = json.loads((run_dir / "results.json").read_text())
    same_run(resumed, straight)
    assert resumed["resumed_after_epochs"] and straight["resumed_after_epochs"] == []
    assert not list(run_dir.glob(".*.tmp*"))  # the half-written file of step 1 was cleared


def test_resume_refuses_another_config_or_dataset(tiny_dataset, tmp_path):
    cfg = stage4.common.parse_config(stage4.Config, [str(tiny_dataset), *ARGS, "--epochs", "2", "--name", "r"])
    first = stage4.train(cfg)
    with pytest.raises(SystemExit, match=r"--resume: .*last.pt was written with another config \(--lr 0.001 there, "
                                         r"0.01 now\)"):
        stage4.train(replace(cfg, resume=True, lr=0.01))
    # the same files plus one interaction: another dataset, its runs/r the same directory
    other = tmp_path / "other"
    other.mkdir()
    for f in ("items.jsonl", "interactions.csv"):
        (other / f).write_bytes((tiny_dataset / f).read_bytes())
    with open(other / "interactions.csv", "a") as f:
        f.write("u0,i3,99999\n")
    (other / "runs").mkdir()
    os.symlink(tiny_dataset / "runs" / "r", other / "runs" / "r")
    with pytest.raises(SystemExit, match="--resume: .*last.pt was written for another dataset"):
        stage4.train(replace(cfg, data=str(other), resume=True))
    # another thread count changes nothing the run computes; resuming a finished run repeats its results
    again = stage4.train(replace(cfg, resume=True, threads=2))
    same_run(again, first)
    assert again["resumed_after_epochs"] == [2]
    # a checkpoint written before a flag existed: its config lacks the field, read there at the flag's default
    last = tiny_dataset / "runs" / "r" / "last.pt"
    ck = torch.load(last, weights_only=False)
    del ck["config"]["match_text"]
    torch.save(ck, last)
    same_run(stage4.train(replace(cfg, resume=True)), first)
    with pytest.raises(SystemExit, match=r"--match-text 'pooled' there, 'tfidf' now"):
        stage4.train(replace(cfg, resume=True, match_text="tfidf"))


def test_resume_with_a_larger_epoch_budget_equals_a_run_started_with_it(tiny_dataset):
    # a run that hit --epochs 3 (patience long enough not to stop it), extended to 5: the same as 5 from the start
    # (--eval-every 1, so the old budget's last epoch was evaluated either way)
    args = [str(tiny_dataset), *ARGS, "--patience", "50"]
    cfg = stage4.common.parse_config(stage4.Config, [*args, "--epochs", "3", "--name", "grow"])
    assert stage4.train(cfg)["epochs_run"] == 3
    with pytest.raises(SystemExit, match=r"--epochs 3 there, 2 now"):  # a smaller budget is another run
        stage4.train(replace(cfg, resume=True, epochs=2))
    grown = stage4.train(replace(cfg, resume=True, epochs=5))
    straight = stage4.train(stage4.common.parse_config(stage4.Config, [*args, "--epochs", "5", "--name", "five"]))
    same_run(grown, straight)
    assert grown["epochs_run"] == 5 and grown["resumed_after_epochs"] == [3]


def torchrun_cmd(tiny, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(ROOT / "04_train_backbone.py"), str(tiny), *ARGS, *extra]


def test_torchrun_sigkill_and_sigterm_then_resume_equals_an_uninterrupted_run(tiny_dataset):
    tiny, rnd = tiny_dataset, random.Random(17)
    p = launch(torchrun_cmd(tiny, "--name", "straight"))
    assert run_until(p, 10 ** 9, 0.0) == "finished" and p.returncode == 0
    straight = json.loads((tiny / "runs" / "straight" / "results.json").read_text())
    run_dir, cmd = tiny / "runs" / "ddp", torchrun_cmd(tiny, "--name", "ddp")

    # SIGKILL to the launcher and both ranks at a random point
    assert run_until(launch(cmd), rnd.randint(1, 2), rnd.uniform(0, 0.1)) == "killed"
    ck = torch.load(run_dir / "last.pt", weights_only=False)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2  # rank 0 wrote every rank's generators
    # SIGTERM to the launcher (what a scheduler sends; torchrun relays it to the ranks): a checkpoint, then results
    assert run_until(launch(cmd + ["--resume"]), ck["epoch"] + 1, 0.0, sig=signal.SIGTERM) == "killed"
    interrupted = json.loads((run_dir / "results.json").read_text())
    assert interrupted["interrupted_by"] == "SIGTERM"
    assert torch.load(run_dir / "last.pt", weights_only=False)["epoch"] == interrupted["epochs_run"]
    p = launch(cmd + ["--resume"])
    assert run_until(p, 10 ** 9, 0.0) == "finished" and p.returncode == 0
    resumed = json.loads((run_dir / "results.json").read_text())
    assert resumed["world_size"] == 2 and resumed["interrupted_by"] is None
    same_run(resumed, straight)
