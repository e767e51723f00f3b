"""The DMESR comparison: plain backbone vs DMESR vs each ablation, several seeds, mean ± std, one markdown table.

    python bench/ablation.py DATA --backbone sasrec --seeds 42,43,44 [--loss ce] [--finetune] [--train-args "..."]
    python bench/ablation.py DATA --jobs 16 --train-args "--device cuda"      (many runs at once on one GPU)

Runs what is missing, in order: stage 2 (DATA/aligned.pt) and the stage-3 variants (fused.pt; fused_noalign.pt with
--no-align; fused_nocross.pt with --no-cross), then stage 4 once per (variant, seed):
  plain backbone (--views id) | DMESR (--views dual) | w/o alignment | w/o cross-attention fusion |
  MLLM view only (--views A) | original-text view only (--views B) | [DMESR + --finetune-fusion]
  | [synthetic data only: the content ceiling, --views dual on fused_oracle.pt = the generator's true attributes]
A finished run (DATA/runs/<name>/results.json) is reused, so an interrupted comparison resumes where it stopped.
Writes bench/results/<dataset>_<backbone>[_<loss>][_<tag>].md: test metrics, full ranking (the primary
protocol), overall and on tail items, mean ± sample std over the seeds, with protocol, loss, dataset and seeds; and
beside it the same name .png: validation curves and test NDCG@10 overall / tail / head (bench/compare.py's plot).
--results DIR writes both to another folder.
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import load_run, metrics, paired, plot, with_content_match  # noqa: E402  (one reader of results.json, one picture)

# name, label, stage-4 flags, stage-3 artifact it needs (None = none)
VARIANTS = [
    ("id", "plain backbone (ID only)", ["--views", "id"], None),
    ("dmesr", "DMESR (dual view, default levers)", ["--views", "dual", "--fused", "{data}/fused.pt"], "fused.pt"),
    # the plug-in levers (EVIDENCE.md), each switched against the defaults; "paper" = all of them off (the plug-in
    # as first reconstructed: adapter + a random-init ID embedding in both views, tables unconditioned)
    ("paper", "plug-in without levers (ID in both views, random init, no whitening)",
     ["--views", "dual", "--fused", "{data}/fused.pt", "--no-whiten", "--id-init", "random", "--id-free", ""],
     "fused.pt"),
    ("whiten", "lever on: whitened content tables", ["--views", "dual", "--fused", "{data}/fused.pt", "--whiten"],
     "fused.pt"),
    ("randinit", "lever off: random ID init (no PCA)", ["--views", "dual", "--fused", "{data}/fused.pt",
                                                        "--id-init", "random"], "fused.pt"),
    ("idboth", "lever off: ID part in both views", ["--views", "dual", "--fused", "{data}/fused.pt", "--id-free", ""],
     "fused.pt"),
    ("seen", "lever off: the user's own items stay candidates (--no-exclude-seen)",
     ["--views", "dual", "--fused", "{data}/fused.pt", "--no-exclude-seen"], "fused.pt"),
    ("idseen", "plain backbone, own items stay candidates", ["--views", "id", "--no-exclude-seen"], None),
    ("gate", "lever on: popularity-gated ID part (k = 2)", ["--views", "dual", "--fused", "{data}/fused.pt",
                                                            "--id-gate", "2"], "fused.pt"),
    ("iddrop", "lever on: item ID part dropped in training (p = 0.1, DropoutNet)",
     ["--views", "dual", "--fused", "{data}/fused.pt", "--id-dropout", "0.1"], "fused.pt"),
    ("noresidual", "lever off: no content residual (w x cosine to the last item's content, w learned)",
     ["--views", "dual", "--fused", "{data}/fused.pt", "--no-content-residual"], "fused.pt"),
    ("lags", "lever on: content residual over the last 2 items read (one w per lag)",
     ["--views", "dual", "--fused", "{data}/fused.pt", "--residual-lags", "2"], "fused.pt"),
    ("rare", "lever on: content residual weighted up on rare candidates (w x (1 + u x rarity), u learned)",
     ["--views", "dual", "--fused", "{data}/fused.pt", "--residual-rare"], "fused.pt"),
    ("tfidf", "lever on: content residual over TF-IDF word overlap of the item text (not the encoder's cosine)",
     ["--views", "dual", "--fused", "{data}/fused.pt", "--residual-text", "tfidf"], "fused.pt"),
    ("popadj", "lever on: logit adjustment by training popularity (tau = 1)",
     ["--views", "dual", "--fused", "{data}/fused.pt", "--pop-adjust", "1"], "fused.pt"),
    ("idpopadj", "plain backbone + logit adjustment (tau = 1)", ["--views", "id", "--pop-adjust", "1"], None),
    ("idalign", "lever on: item-level alignment of adapter outputs with the ID table (weight 0.1)",
     ["--views", "dual", "--fused", "{data}/fused.pt", "--id-align", "0.1"], "fused.pt"),
    ("raw", "lever: stage-1 vectors instead of stage 3's fused views", ["--views", "dual", "--semantic", "raw"],
     None),
    ("both", "lever: stage-1 vectors beside stage 3's fused views", ["--views", "dual", "--fused", "{data}/fused.pt",
                                                                     "--semantic", "both"], "fused.pt"),
    ("noalign", "w/o alignment", ["--views", "dual", "--fused", "{data}/fused_noalign.pt"], "fused_noalign.pt"),
    ("nocross", "w/o cross-attention fusion", ["--views", "dual", "--fused", "{data}/fused_nocross.pt"],
     "fused_nocross.pt"),
    ("A", "MLLM view only (h_A)", ["--views", "A", "--fused", "{data}/fused.pt", "--id-free", ""], "fused.pt"),
    ("B", "original-text view only (h_B)", ["--views", "B", "--fused", "{data}/fused.pt", "--id-free", ""],
     "fused.pt"),
]
# rows read from the runs above, not trained: the inference-time content-match term (gamma chosen on validation) on
# top of a variant, and the training-free content-only ranking (cosine to the last item; any run holds it)
DERIVED = [("id", "test", "plain backbone + content match"), ("id", "content_only", "content only (no training)"),
           ("dmesr", "test", "DMESR + content match")]
FINETUNE = ("dmesr_ft", "DMESR + fine-tuned fusion", ["--views", "dual", "--fused", "{data}/fused.pt",
                                                      "--finetune-fusion"], "fused.pt")
# On synthetic data the generating attributes are known: h_A = one-hot image attributes (category, colour, shape,
# pattern), h_B = one-hot text attributes (category, brand, price band). Not a method, a ceiling: what perfect content
# understanding could add over the ID embedding with the same stage-4 plug-in. If it adds nothing, no MLLM can.
ORACLE = ("oracle", "content ceiling: true attributes (synthetic only)", ["--views", "dual", "--fused",
                                                                           "{data}/fused_oracle.pt"], None)
ORACLE_VIEWS = {"h_A": ["category", "colour", "shape", "pattern"], "h_B": ["category", "brand", "price_band"]}
STAGE3_FLAGS = {"fused.pt": [], "fused_noalign.pt": ["--no-align"], "fused_nocross.pt": ["--no-cross"]}
COLUMNS = ["NDCG@10", "HR@10", "MRR"]


def run(cmd: list[str], log_path: Path, check: bool = True, deadline: float = 0.0) -> None:
    """Run one stage with nice (the CPU is shared), its output to a log file; stop with the log's tail on failure
    (check). With a deadline (a time.time() value), a run not started by then is skipped and one still going gets
    SIGTERM, on which stage 4 finishes its epoch and tests its best epoch so far."""
    if deadline and time.time() >= deadline:
        print(f"skipped (deadline passed): {shlex.join(cmd)}", flush=True)
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}  > {log_path}", flush=True)
    t0 = time.time()
    with open(log_path, "w") as f:
        p = subprocess.Popen(["nice", "-n", "10", sys.executable, *cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
        try:
            p.wait(timeout=max(0.0, deadline - time.time()) if deadline else None)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGTERM)
            p.wait()
    if p.returncode != 0 and check:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"failed ({p.returncode}) after {time.time() - t0:.0f}s: {shlex.join(cmd)}\n{tail}")
    print(f"  {'done' if p.returncode == 0 else f'exited {p.returncode}'} in {time.time() - t0:.0f}s: {log_path.stem}",
          flush=True)


def run_all(todo: list, jobs: int, **kw) -> None:
    """Run (cmd, log) pairs, `jobs` at a time (keywords go to run); every run is independent (own seed, own output
    directory)."""
    with ThreadPoolExecutor(max(1, jobs)) as ex:
        list(ex.map(lambda t: run(*t, **kw), todo))


def write_oracle_fused(data: Path) -> None:
    import torch
    sys.path.insert(0, str(ROOT))
    import common
    ds = common.load_dataset(data, check_images=False)
    with open(data / "synthetic_attributes.csv") as f:
        rows = {r["item_id"]: r for r in csv.DictReader(f)}
    tables = {}
    for view, fields in ORACLE_VIEWS.items():
        vocab = [(f, v) for f in fields for v in sorted({rows[i][f] for i in ds.item_ids})]
        col = {fv: j for j, fv in enumerate(vocab)}
        x = torch.zeros(ds.n_items, len(vocab))
        for n, i in enumerate(ds.item_ids):
            x[n, [col[(f, rows[i][f])] for f in fields]] = 1.0
        tables[view] = x
    d = max(t.shape[1] for t in tables.values())  # stage 4 reads both views at one width
    tables = {k: torch.nn.functional.pad(t, (0, d - t.shape[1])) for k, t in tables.items()}
    common.save_artifact(data / "fused_oracle.pt", "fused", {"item_ids": ds.item_ids, **tables},
                         {"oracle": ORACLE_VIEWS, "source": "synthetic_attributes.csv"}, ds.fingerprint)


def stage4():  # imported when a table is made: the selection-protocol keys live there (one mapping)
    sys.path.insert(0, str(ROOT))
    import importlib
    return importlib.import_module("04_train_backbone")


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("data", help="dataset directory with semantics.pt (stage 1)")
    p.add_argument("--backbone", default="sasrec", help="sasrec | gru4rec | bert4rec")
    p.add_argument("--seeds", default="42,43,44", help="comma-separated stage-4 seeds")
    p.add_argument("--loss", default="ce", help="ce | bce")
    p.add_argument("--finetune", action="store_true", help="also run DMESR with --finetune-fusion")
    p.add_argument("--variants", default="", help="comma-separated subset of: " + ",".join(v[0] for v in VARIANTS)
                   + ",dmesr_ft,oracle (default: all; dmesr_ft only with --finetune; oracle on synthetic data)")
    p.add_argument("--train-args", default="", help="extra flags passed to every stage-4 run (quoted)")
    p.add_argument("--fuse-args", default="", help="extra flags passed to every stage-3 run (quoted); with --tag, "
                   "the stage-3 artifacts get the tag too (fused_<tag>.pt), else the default ones are shared")
    p.add_argument("--tag", default="", help="suffix for run names and the result file (a design-choice experiment)")
    p.add_argument("--share-plain", action="store_true", help="the plain runs keep their untagged names (for a --tag "
                   "whose flags cannot change the plain backbone, e.g. --no-id-emb)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per stage run (1 is fastest on shared cores)")
    p.add_argument("--rerun-stage3", action="store_true", help="rebuild the stage-2/3 artifacts even if present")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"), help="folder for the table and picture")
    p.add_argument("--jobs", type=int, default=1, help="stage runs at a time (stage-3 variants, then stage-4 runs); "
                   "e.g. many on one GPU with --train-args '--device cuda', or one per core with --threads 1")
    a = p.parse_args(argv)

    data = Path(a.data)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    synthetic = (data / "synthetic_attributes.csv").is_file()
    variants = VARIANTS + ([FINETUNE] if a.finetune else []) + ([ORACLE] if synthetic else [])
    if a.variants:
        want = a.variants.split(",")
        variants = [v for v in VARIANTS + [FINETUNE, ORACLE] if v[0] in want]
    logs = data / "runs" / "_ablation_logs"
    sfx = f"_{a.tag}" if a.tag else ""
    fsfx = sfx if a.fuse_args else ""  # a tag only makes its own stage-3 artifacts when stage 3 runs differently

    # ---- stages 2 and 3, once per artifact ----
    needs_stage3 = any(v[3] for v in variants)  # the plain and oracle variants read no stage-2/3 artifact
    if needs_stage3 and (not (data / "aligned.pt").is_file() or a.rerun_stage3):
        run(["02_align.py", str(data), "--threads", str(a.threads)], logs / "02_align.log")
    todo = []
    for art in sorted({v[3] for v in variants if v[3]}):
        out = data / art.replace(".pt", f"{fsfx}.pt")
        if not out.is_file() or a.rerun_stage3:
            todo.append((["03_fuse.py", str(data), "--out", out.name, "--threads", str(a.threads), *STAGE3_FLAGS[art],
                          *shlex.split(a.fuse_args)], logs / f"03_{out.stem}.log"))
    run_all(todo, a.jobs)

    if any(v[0] == "oracle" for v in variants) and not (data / "fused_oracle.pt").is_file():
        write_oracle_fused(data)

    # ---- stage 4, once per (variant, seed) ----
    names: dict[str, list[str]] = {}
    todo = []
    for key, label, flags, art in variants:
        for seed in seeds:
            name = f"{a.backbone}_{a.loss}_{key}{'' if key == 'id' and a.share_plain else sfx}_s{seed}"
            names.setdefault(key, []).append(name)
            if (data / "runs" / name / "results.json").is_file():
                print(f"reusing {name}", flush=True)
                continue
            fl = [f.format(data=data) for f in flags]
            fl = [f.replace(".pt", f"{fsfx}.pt") for f in fl] if art else fl  # stage-3 artifacts carry the tag
            todo.append((["04_train_backbone.py", str(data), "--backbone", a.backbone, "--loss", a.loss, "--seed",
                          str(seed), "--name", name, "--threads", str(a.threads), *fl, *shlex.split(a.train_args)],
                         logs / f"{name}.log"))
    run_all(todo, a.jobs)

    # ---- the table: mean ± std over seeds, full ranking, overall and tail items ----
    res = {k: [load_run(data, n) for n in ns] for k, ns in names.items()}
    rows, summary = [], {}
    derived = [(f"{k}+{src}", label, [with_content_match(r, src) for r in res[k]]) for k, src, label in DERIVED
               if k in res and all(with_content_match(r, src) for r in res[k])]
    for key, label, runs in [(v[0], v[1], res[v[0]]) for v in variants] + derived:
        res[key] = runs
        overall = [metrics(r, "full") for r in res[key]]
        tail = [metrics(r, "full", "tail_items") for r in res[key]]
        cells = {c: mean_std([m[c] for m in overall]) for c in COLUMNS}
        cells["tail NDCG@10"] = mean_std([t["NDCG@10"] for t in tail]) if all(tail) else (float("nan"), 0.0)
        cells["sampled100 HR@10"] = mean_std([metrics(r, "sampled100").get("HR@10", float("nan")) for r in res[key]])
        # the figure the defaults are chosen on: validation NDCG@10 of the selected protocol at the best epoch
        cells["valid"] = mean_std([r["valid"][stage4().SELECT[r["config"].get("select", "full")]]["NDCG@10"]
                                   for r in runs])
        summary[key] = cells
        secs = statistics.fmean(r.get("train_seconds", float("nan")) for r in res[key])
        # where each run stopped: a variant whose runs stop early (or hit the epoch cap) is not trained like the others
        ep = ", ".join(f"{r.get('best_epoch', '?')}/{r.get('epochs_run', '?')}{'*' if r.get('interrupted_by') else ''}"
                       for r in res[key])
        if "+" in key:  # a derived row: the weights each seed's validation chose
            ep = "no training"
            if key.endswith("+test"):
                cms = [r["content_match"] for r in runs]
                ep = "gamma " + ", ".join(f"{c['gamma']:g}" for c in cms)
                if len(cms[0].get("tail_grid", [])) > 1:  # --match-tail
                    ep += "; tail " + ", ".join(f"{c['tail_weight']:g}" for c in cms)
                if len(cms[0].get("query_grid", [])) > 1:  # --match-query
                    ep += "; tail query " + ", ".join(f"{c['query_weight']:g}" for c in cms)
        rows.append(f"| {label} | " + " | ".join(f"{m:.4f} ± {s:.4f}" for m, s in cells.values())
                    + f" | {ep} | {secs:.0f} |")

    def verdict(key: str, col: str, base: str = "id") -> str:
        (m1, s1), (m0, s0) = summary[key][col], summary[base][col]
        gap = m1 - m0
        if len(seeds) < 2:
            return f"{gap:+.4f} (one seed: no std, no verdict)"
        ok = "**yes**" if gap > s0 + s1 else "no"
        return f"{gap:+.4f} vs std sum {s0 + s1:.4f}: {ok}"

    cfg0 = res[variants[0][0]][0].get("config", {})
    head = ["variant", *COLUMNS, "tail NDCG@10", "sampled-100 HR@10", "validation NDCG@10",
            "best / last epoch per seed", "train s"]
    lines = [
        f"# {data.name}: {a.backbone}, loss {a.loss}{' (' + a.tag + ')' if a.tag else ''}",
        "",
        f"Dataset `{data}`; backbone {a.backbone}; loss `{a.loss}`; seeds {', '.join(map(str, seeds))} "
        f"(mean ± sample std over seeds). Protocol: leave-one-out test set, **full ranking**: "
        f"{res[variants[0][0]][0].get('protocol', {}).get('full', 'rank among all items')} "
        f"(sampled-100 HR@10 in its own column); tail items = the tail group of 04_train_backbone.py (by training "
        f"popularity). Stage-4 extra flags: `{a.train_args or 'none'}`; stage-3 extra flags: `{a.fuse_args or 'none'}`."
        f" Stage 4: at most {cfg0.get('epochs', '?')} epochs, patience {cfg0.get('patience', '?')} (* = stopped by a "
        f"signal); device: {res[variants[0][0]][0].get('device', 'not recorded')}.",
        f"Semantics backend: {semantics_label(data)}.",
        "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows, "",
    ]
    if "dmesr" in summary and "id" in summary:
        lines += ["DMESR as trained against the plain backbone (ahead by more than the two std combined?):",
                  f"- overall: {verdict('dmesr', 'NDCG@10')}", f"- tail items: {verdict('dmesr', 'tail NDCG@10')}", ""]
    if "dmesr+test" in summary and "id+test" in summary:
        lines += ["Both with the content-match term, DMESR against plain + content match:",
                  f"- overall: {verdict('dmesr+test', 'NDCG@10', 'id+test')}",
                  f"- tail items: {verdict('dmesr+test', 'tail NDCG@10', 'id+test')}", ""]
    if "dmesr" in names and "id" in names:  # the test set's own sampling error, one seed at a time
        pairs = [(i, d) for i, d in zip(names["id"], names["dmesr"])]
        pairs += [(f"{i}:cm", d) for i, d in pairs if with_content_match(load_run(data, i))]
        if all((data / "runs" / n / "test_ranks.csv").is_file() for p in pairs for n in (p[0].split(":")[0], p[1])):
            lines += ["DMESR as trained against plain (and against plain + content match, `:cm`), user by user on the "
                      "test set, per seed: the mean NDCG@10 difference and its 95% interval over test users "
                      "(`bench/compare.py --paired`):", "", paired(data, pairs), ""]
    out = Path(a.results) / f"{data.name}_{a.backbone}{'' if a.loss == 'ce' else '_' + a.loss}{sfx}.md"
    lines += ["Runs: " + ", ".join(f"`{n}`" for ns in names.values() for n in ns), "",
              f"![validation curves and test NDCG@10]({out.with_suffix('.png').name})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    plot(data, {label: names[key] for key, label, _, _ in variants}, out.with_suffix(".png"), "full",
         title=f"{data.name}, {a.backbone}, loss {a.loss}{' (' + a.tag + ')' if a.tag else ''}")
    print(f"wrote {out} and {out.with_suffix('.png').name}")


def semantics_label(data: Path) -> str:
    """The stage-1 backend as stage 1 recorded it, so a table never hides which 'MLLM' produced the semantics."""
    try:
        import torch
        cfg = torch.load(data / "semantics.pt", map_location="cpu", weights_only=False).get("config", {})
    except Exception as e:  # the table is still worth writing; say why the label is missing
        return f"unknown ({type(e).__name__} reading semantics.pt)"
    keys = [k for k in ("mllm", "backend", "backend_label", "encoder", "style") if k in cfg]
    return ", ".join(f"{k}={cfg[k]}" for k in keys) or json.dumps(cfg)[:200]


if __name__ == "__main__":
    main()
