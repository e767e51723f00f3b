"""Print a markdown table comparing finished stage-4 runs (full-ranking test metrics, overall and on tail items).

    python bench/compare.py DATA RUN [RUN ...] [--protocol full|sampled100]

Reads DATA/runs/<RUN>/results.json (written by 04_train_backbone.py); prints one row per run with its protocol, loss,
seed and views, so every number says how it was measured.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRICS = ["NDCG@10", "HR@10", "MRR"]


def load_run(data: str | Path, name: str) -> dict:
    path = Path(data) / "runs" / name / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: not found; run `python 04_train_backbone.py {data} --name {name}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def metrics(res: dict, protocol: str = "full", group: str | None = None) -> dict:
    """Test metrics of one run under `protocol` ("full" or "sampled100"); with `group` ("tail_items", "head_items",
    "short_users", "long_users") those of that group of test users; {} when the run has no such entry."""
    test = res.get("test", {})
    return (test if group is None else test.get("groups", {}).get(group, {})).get(protocol, {})


def with_content_match(res: dict, key: str = "test") -> dict:
    """The run as ranked with its inference-time content-match term (key "test", gamma chosen on validation) or by the
    content alone ("content_only"), in the shape metrics() reads; {} when the run has none (no semantics.pt)."""
    cm = res.get("content_match") or {}
    return {**res, "test": cm[key]} if key in cm else {}


def describe(res: dict) -> dict:
    cfg = {**res.get("config", {}), **{k: v for k, v in res.items() if not isinstance(v, (dict, list))}}
    return {"backbone": cfg.get("backbone", "?"), "views": cfg.get("views", "?"), "loss": cfg.get("loss", "?"),
            "seed": cfg.get("seed", "?"), "fused": Path(cfg["fused"]).name if cfg.get("fused") else "",
            "finetune": bool(cfg.get("finetune_fusion", False)), "id_emb": cfg.get("id_emb", True)}


def fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "—"


def table(data: str, names: list[str], protocol: str = "full") -> str:
    head = ["run", "backbone", "views", "protocol", "loss", "seed", *METRICS, "tail NDCG@10"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        res = load_run(data, name)
        d, m, tail = describe(res), metrics(res, protocol), metrics(res, protocol, "tail_items")
        views = d["views"] + (f" ({d['fused']})" if d["views"] != "id" and d["fused"] else "") \
            + (" +finetune" if d["finetune"] else "") + ("" if d["id_emb"] else " no-ID")
        rows.append("| " + " | ".join([name, str(d["backbone"]), views, protocol, str(d["loss"]), str(d["seed"]),
                                       *(fmt(m.get(k)) for k in METRICS), fmt(tail.get("NDCG@10"))]) + " |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="dataset directory holding runs/")
    p.add_argument("runs", nargs="+", help="run names (DATA/runs/<name>)")
    p.add_argument("--protocol", default="full", choices=["full", "sampled100"], help="test protocol to print")
    a = p.parse_args(argv)
    print(f"dataset {a.data}, test set, {a.protocol} ranking"
          + (" over all items" if a.protocol == "full" else " (100 sampled negatives)"))
    print(table(a.data, a.runs, a.protocol))


if __name__ == "__main__":
    sys.exit(main())
