"""Print a markdown table comparing finished stage-4 runs (full-ranking test metrics, overall and on tail items).

    python bench/compare.py DATA RUN [RUN ...] [--protocol full|sampled100] [--plot FILE.png]
    python bench/compare.py DATA BASE RUN [RUN ...] --paired     # each RUN against BASE, user by user

--paired reads DATA/runs/<RUN>/test_ranks.csv and prints, for each RUN against the first, the mean per-user difference
in test NDCG@10 with its 95% confidence interval over the test users (mean +- 1.96 x sample std / sqrt(users)), overall
and on tail-item users, and how many users each run ranks better. That interval is the test set's sampling error for
one pair of runs; the spread over training seeds is the other error, so compare seeds as well. NAME:cm takes a run
with its content match (gamma chosen on validation), NAME:content the content-only reference of that run.

Reads DATA/runs/<RUN>/results.json (written by 04_train_backbone.py); prints one row per run with its protocol, loss,
seed and views, so every number says how it was measured. --plot also draws the picture: each run's validation
NDCG@10 against the epoch, and bars of test NDCG@10 for all users / tail items / head items. Runs whose names differ
only in a trailing _s<SEED> are one variant: one colour, bars at the mean with the sample std as error bars.
"""
from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import sys
from pathlib import Path

import numpy as np

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
    if key not in cm:
        return {}
    return {**res, "test": cm[key], "valid": cm["valid"] if key == "test" else cm[key]["valid"]}


def match_weights(res: dict) -> str:
    """The content-match weights validation chose: "gamma G", with "+ tail B" where --match-tail was on and "+ tail
    query D" where --match-query was."""
    cm = res["content_match"]
    return (f"gamma {cm['gamma']:g}" + (f" + tail {cm['tail_weight']:g}" if len(cm.get("tail_grid", [])) > 1 else "")
            + (f" + tail query {cm['query_weight']:g}" if len(cm.get("query_grid", [])) > 1 else ""))


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
        cm = with_content_match(res)
        if cm:  # the same model with the inference-time content-match term (gamma chosen on validation)
            m, tail = metrics(cm, protocol), metrics(cm, protocol, "tail_items")
            rows.append("| " + " | ".join([f"{name} + content match ({match_weights(res)})",
                                           str(d["backbone"]), views, protocol, str(d["loss"]), str(d["seed"]),
                                           *(fmt(m.get(k)) for k in METRICS), fmt(tail.get("NDCG@10"))]) + " |")
    return "\n".join(rows)


def seed_groups(names: list[str]) -> dict[str, list[str]]:
    """{variant: its runs}: names that differ only in a trailing _s<SEED> (the default and bench/ablation.py names)."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(re.sub(r"_s\d+$", "", n), []).append(n)
    return groups


BARS = [(None, "all users"), ("tail_items", "tail items"), ("head_items", "head items")]


def plot(data: str | Path, groups: dict[str, list[str]], path: str | Path, protocol: str = "full",
         title: str = "") -> Path:
    """A PNG (1200 x 500 px): left, validation NDCG@10 of every run against the epoch (a colour per variant, a dot at
    the best epoch); right, test NDCG@10 for all users / tail items / head items, one bar per variant at the mean over
    its runs, error bars = sample std when it has several seeds. `groups` = {legend label: run names}."""
    import matplotlib
    matplotlib.use("Agg")  # no display needed: works on a headless box
    import matplotlib.pyplot as plt

    res = {label: [load_run(data, n) for n in names] for label, names in groups.items()}
    fig, (ax_c, ax_b) = plt.subplots(1, 2, figsize=(12, 5), dpi=100, layout="constrained",
                                     gridspec_kw={"width_ratios": [1.25, 1]})
    colours = plt.get_cmap("tab10").colors
    width = 0.8 / len(res)
    seeds = set()
    for g, (label, runs) in enumerate(res.items()):
        c = colours[g % len(colours)]
        for r in runs:
            pts = [(row["epoch"], row["valid"][protocol]["NDCG@10"]) for row in r.get("curve", []) if "valid" in row]
            if pts:
                ax_c.plot(*zip(*pts), color=c, lw=1.4, alpha=0.85)
                best = dict(pts).get(r.get("best_epoch"))
                if best is not None:
                    ax_c.plot([r["best_epoch"]], [best], "o", color=c, ms=5)
        vals = [[metrics(r, protocol, grp).get("NDCG@10", float("nan")) for r in runs] for grp, _ in BARS]
        mean = [statistics.fmean(v) for v in vals]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        seeds.add(len(runs))
        xs = [j - 0.4 + width * (g + 0.5) for j in range(len(BARS))]
        ax_b.bar(xs, mean, width, yerr=std if len(runs) > 1 else None, capsize=3, color=c,
                 label=label + (f" ({len(runs)} seeds)" if len(runs) > 1 else ""))
        if len(res) <= 4:  # values above the error bars; more variants would make them overlap
            for x, m, sd in zip(xs, mean, std):
                ax_b.annotate(f"{m:.3f}", (x, m + sd), xytext=(0, 3), textcoords="offset points", ha="center",
                              va="bottom", fontsize=8)
    first = next(iter(res.values()))[0].get("test", {}).get("groups", {})
    ax_b.set_xticks(range(len(BARS)), [name + (f"\n({first[grp]['users']} users)" if grp in first else "")
                                       for grp, name in BARS])
    proto = "full ranking" if protocol == "full" else "100 sampled negatives"
    ax_c.set(xlabel="epoch", ylabel=f"validation NDCG@10 ({protocol})", title="validation curve (dot: best epoch)")
    spread = "bars: mean ± sample std over seeds" if max(seeds) > 1 else "one seed per variant"
    ax_b.set(ylabel=f"test NDCG@10 ({protocol})", title="test set, each run's best epoch")
    ax_b.margins(y=0.12)
    for ax in (ax_c, ax_b):
        ax.grid(alpha=0.3)
    longest = max(len(lab) for lab in ax_b.get_legend_handles_labels()[1])
    ncol = max(1, min(len(res), 4, 1150 // (6 * longest + 45)))  # as many columns as fit 1200 px at 9 pt (~6 px/char)
    fig.legend(loc="outside lower center", ncol=ncol, frameon=False, fontsize=9)
    fig.suptitle(f"{title or Path(data).name}: {proto}; {spread}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


RANK_COLUMNS = {"": "", "cm": "cm_", "content": "content_"}


def load_ranks(data: str | Path, spec: str, protocol: str) -> dict:
    """{user_id: (target item, head item?, rank)} of DATA/runs/<NAME>/test_ranks.csv; spec = NAME[:cm|:content]."""
    name, _, which = spec.partition(":")
    if which not in RANK_COLUMNS:
        raise SystemExit(f"{spec}: expected NAME, NAME:cm or NAME:content")
    path, col = Path(data) / "runs" / name / "test_ranks.csv", RANK_COLUMNS[which] + protocol
    if not path.is_file():
        raise SystemExit(f"{path}: not found (runs written before per-user ranks were saved have none: rerun "
                         f"`python 04_train_backbone.py {data} --name {name} ...`)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        if col not in (rows.fieldnames or []):
            raise SystemExit(f"{path}:1: no column {col!r} (this run has {', '.join(rows.fieldnames or [])})")
        out = {}
        for line, r in enumerate(rows, start=2):
            try:
                out[r["user_id"]] = (r["item_id"], r["head_item"] == "1", int(r[col]))
            except (KeyError, TypeError, ValueError):
                raise SystemExit(f"{path}:{line}: field {col!r}: expected an integer rank, got {r.get(col)!r}") \
                    from None
    return out


def paired(data: str | Path, pairs: list[tuple[str, str]], protocol: str = "full") -> str:
    """A markdown table, one row per (base, run) pair: per-user NDCG@10 differences run - base with 95% intervals
    (see the docstring)."""
    import importlib
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    ndcg = importlib.import_module("04_train_backbone").user_ndcg  # the one metrics function

    def interval(d) -> str:
        if len(d) < 2:
            return "—"
        half = 1.96 * float(np.std(d, ddof=1)) / np.sqrt(len(d))
        return f"{d.mean():+.4f} [{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]"

    head = ["run", "against", "users", "Δ NDCG@10 [95% CI]", "tail users", "Δ tail NDCG@10 [95% CI]",
            "users better / worse"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ref, spec in pairs:
        base, other = load_ranks(data, ref, protocol), load_ranks(data, spec, protocol)
        if other.keys() != base.keys() or any(other[u][0] != base[u][0] for u in base):
            raise SystemExit(f"{spec} and {ref}: different test users or targets (another dataset or split?)")
        users = list(base)
        a = ndcg(np.array([base[u][2] for u in users]), 10)
        b = ndcg(np.array([other[u][2] for u in users]), 10)
        tail = np.array([not base[u][1] for u in users])
        d = b - a
        rows.append("| " + " | ".join([spec, ref, str(len(d)), interval(d), str(int(tail.sum())),
                                       interval(d[tail]), f"{int((d > 0).sum())} / {int((d < 0).sum())}"]) + " |")
    return "\n".join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("data", help="dataset directory holding runs/")
    p.add_argument("runs", nargs="+", help="run names (DATA/runs/<name>)")
    p.add_argument("--protocol", default="full", choices=["full", "sampled100"], help="test protocol to print")
    p.add_argument("--plot", default="", metavar="FILE.png", help="also draw validation curves and test bars here")
    p.add_argument("--paired", action="store_true",
                   help="each run against the first, user by user: NDCG@10 differences with 95%% intervals")
    a = p.parse_args(argv)
    if a.paired:
        if len(a.runs) < 2:
            raise SystemExit("--paired needs a base run and at least one run to compare with it")
        print(f"dataset {a.data}, test set, {a.protocol} ranking, per-user differences against {a.runs[0]} "
              "(95% CI over test users; tail = target outside the training-popularity head)")
        print(paired(a.data, [(a.runs[0], r) for r in a.runs[1:]], a.protocol))
        return
    first = load_run(a.data, a.runs[0]).get("protocol", {})
    print(f"dataset {a.data}, test set, {a.protocol} ranking: "
          + first.get("full" if a.protocol == "full" else "sampled100", "protocol not recorded"))
    print(table(a.data, a.runs, a.protocol))
    if a.plot:
        print(f"wrote {plot(a.data, seed_groups(a.runs), a.plot, a.protocol)}")


if __name__ == "__main__":
    sys.exit(main())
