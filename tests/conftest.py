"""Shared fixtures: the repo root, a subprocess runner for the stage scripts, and small datasets built on the fly."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))


def run_script(script, *args, check=True, timeout=600, env=None):
    """Run one of the repo's scripts in a subprocess (as a user would) and return the CompletedProcess."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    e.update(env or {})
    p = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} exited {p.returncode}\n"
                             f"--- stdout ---\n{p.stdout[-4000:]}\n--- stderr ---\n{p.stderr[-4000:]}")
    return p


def write_dataset(root: Path, seqs: dict, items: list[dict]) -> Path:
    """Write a canonical dataset directory from {user: [item, ...]} (chronological) and item objects."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "items.jsonl", "w") as f:
        for it in items:
            f.write(json.dumps(it) + "\n")
    with open(root / "interactions.csv", "w") as f:
        f.write("user_id,item_id,timestamp\n")
        for u, s in seqs.items():
            for t, i in enumerate(s):
                f.write(f"{u},{i},{1000 + t}\n")
    return root


@pytest.fixture
def tiny_dataset(tmp_path):
    """80 users over 40 text-only items with a learnable pattern (next item = previous + 1, mostly)."""
    return make_tiny_dataset(tmp_path / "tiny")


def make_tiny_dataset(root: Path) -> Path:
    """The tiny_dataset fixture's data, for fixtures of a wider scope."""
    rng = np.random.default_rng(0)
    n_items = 40
    items = [{"item_id": f"i{k}", "title": f"product {k} in family {k % 5}", "brand": f"brand{k % 7}"}
             for k in range(n_items)]
    seqs = {}
    for u in range(80):
        start, length = rng.integers(n_items), rng.integers(5, 15)
        seqs[f"u{u}"] = [f"i{(start + j) % n_items}" if rng.random() < 0.8 else f"i{rng.integers(n_items)}"
                         for j in range(length)]
    return write_dataset(root, seqs, items)
