"""The pictures: bench/compare.py --plot and bench/ablation.py draw validation curves and test bars into a PNG that
opens, has the documented size, and shows one colour per variant (runs differing only in their seed share one)."""
import importlib
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_script

stage4 = importlib.import_module("04_train_backbone")
sys.path.insert(0, str(ROOT / "bench"))
compare = importlib.import_module("compare")
TAB10 = {"blue": (31, 119, 180), "orange": (255, 127, 14), "green": (44, 160, 44)}


def colour_pixels(png, rgb) -> int:
    a = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int((np.abs(a - np.array(rgb)).sum(-1) < 30).sum())


def test_seed_groups_join_runs_that_differ_only_in_the_seed():
    assert compare.seed_groups(["sasrec_ce_id_s42", "sasrec_ce_id_s43", "dmesr_s42", "plain", "x_s1_b"]) == {
        "sasrec_ce_id": ["sasrec_ce_id_s42", "sasrec_ce_id_s43"], "dmesr": ["dmesr_s42"], "plain": ["plain"],
        "x_s1_b": ["x_s1_b"]}


def test_compare_plot_of_two_tiny_runs_is_a_readable_png(tiny_dataset, tmp_path):
    kw = dict(data=str(tiny_dataset), views="id", epochs=3, batch_size=16, hidden=16, threads=1)
    stage4.train(stage4.Config(name="sas", **kw))
    stage4.train(stage4.Config(name="gru", backbone="gru4rec", **kw))
    out = run_script("bench/compare.py", tiny_dataset, "sas", "gru", "--plot", tmp_path / "pics" / "cmp.png").stdout
    assert "| sas |" in out and f"wrote {tmp_path / 'pics' / 'cmp.png'}" in out
    with Image.open(tmp_path / "pics" / "cmp.png") as im:
        assert im.format == "PNG" and im.size == (1200, 500)
    # two variants: blue and orange (curves, bars, legend); no third colour
    assert colour_pixels(tmp_path / "pics" / "cmp.png", TAB10["blue"]) > 2000
    assert colour_pixels(tmp_path / "pics" / "cmp.png", TAB10["orange"]) > 2000
    assert colour_pixels(tmp_path / "pics" / "cmp.png", TAB10["green"]) == 0
    with pytest.raises(SystemExit, match="runs/missing/results.json: not found"):
        compare.plot(tiny_dataset, {"x": ["missing"]}, tmp_path / "x.png")


def test_ablation_writes_the_picture_beside_its_table(tiny_dataset, tmp_path):
    """Two seeds of the plain variant, trained here under the names bench/ablation.py gives them (so it reuses them
    instead of starting subprocesses): one colour for both seeds, and the table links the picture."""
    for seed in (1, 2):
        stage4.train(stage4.Config(data=str(tiny_dataset), views="id", epochs=2, batch_size=16, hidden=16, threads=1,
                                   seed=seed, name=f"sasrec_ce_id_s{seed}"))
    ablation = importlib.import_module("ablation")
    ablation.main([str(tiny_dataset), "--variants", "id", "--seeds", "1,2", "--results", str(tmp_path)])
    md, png = tmp_path / "tiny_sasrec.md", tmp_path / "tiny_sasrec.png"
    assert "![validation curves and test NDCG@10](tiny_sasrec.png)" in md.read_text()
    with Image.open(png) as im:
        assert im.size == (1200, 500)
    assert colour_pixels(png, TAB10["blue"]) > 2000 and colour_pixels(png, TAB10["orange"]) == 0


def test_ablation_reports_the_content_match_rows_from_the_same_runs(tiny_dataset, tmp_path):
    """With semantics.pt present every run also records the content-match term and the content-only ranking; the
    table shows them as rows of their own, read from those runs (no retraining), with the gamma each seed chose."""
    from test_backbone import write_semantics
    write_semantics(tiny_dataset)
    runs = [stage4.train(stage4.Config(data=str(tiny_dataset), views="id", epochs=2, batch_size=16, hidden=16,
                                       threads=1, seed=seed, name=f"sasrec_ce_id_s{seed}", content_grid="0,1,4"))
            for seed in (1, 2)]
    ablation = importlib.import_module("ablation")
    ablation.main([str(tiny_dataset), "--variants", "id", "--seeds", "1,2", "--results", str(tmp_path)])
    md = (tmp_path / "tiny_sasrec.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| plain backbone + content match |"))
    mean = sum(r["content_match"]["test"]["full"]["NDCG@10"] for r in runs) / 2
    assert row.split("|")[2].strip().startswith(f"{mean:.4f}")
    assert "gamma " + ", ".join(f"{r['content_match']['gamma']:g}" for r in runs) in row
    only = next(line for line in md.splitlines() if line.startswith("| content only (no training) |"))
    assert only.split("|")[2].strip().startswith(f"{runs[0]['content_match']['content_only']['full']['NDCG@10']:.4f}")


def test_ablation_and_compare_name_the_tail_weights_of_match_tail_and_match_query(tiny_dataset, tmp_path):
    """Runs made with --match-tail / --match-query show the weights each seed's validation chose beside its gamma."""
    from test_backbone import write_semantics
    write_semantics(tiny_dataset)
    res = stage4.train(stage4.Config(data=str(tiny_dataset), views="id", epochs=2, batch_size=16, hidden=16, threads=1,
                                     seed=1, name="sasrec_ce_id_s1", content_grid="0,1", match_tail="2,1000",
                                     match_query="3"))
    cm = res["content_match"]
    ablation = importlib.import_module("ablation")
    ablation.main([str(tiny_dataset), "--variants", "id", "--seeds", "1", "--results", str(tmp_path)])
    row = next(line for line in (tmp_path / "tiny_sasrec.md").read_text().splitlines()
               if line.startswith("| plain backbone + content match |"))
    assert f"gamma {cm['gamma']:g}; tail {cm['tail_weight']:g}; tail query {cm['query_weight']:g}" in row
    compare = importlib.import_module("compare")
    weights = f"(gamma {cm['gamma']:g} + tail {cm['tail_weight']:g} + tail query {cm['query_weight']:g})"
    assert weights in compare.table(str(tiny_dataset), ["sasrec_ce_id_s1"])


def test_ablation_adds_the_per_user_paired_differences_per_seed(tiny_dataset, tmp_path):
    """With plain and DMESR runs of the same seeds, the table gets one paired row per seed (and one against plain +
    content match): the mean per-user difference equals the difference of the two runs' test NDCG@10."""
    from test_backbone import write_semantics
    write_semantics(tiny_dataset)
    res = {}
    for key, hidden in (("id", 16), ("dmesr", 8)):  # stand-in runs under the names ablation.py reuses
        for seed in (1, 2):
            res[key, seed] = stage4.train(stage4.Config(data=str(tiny_dataset), views="id", epochs=2, batch_size=16,
                                                        hidden=hidden, threads=1, seed=seed, content_grid="0,1,4",
                                                        name=f"sasrec_ce_{key}_s{seed}"))
    for art in ("aligned.pt", "fused.pt"):  # present, so ablation.py starts no stage 2 / 3 (the runs are reused)
        (tiny_dataset / art).write_bytes(b"")
    ablation = importlib.import_module("ablation")
    ablation.main([str(tiny_dataset), "--variants", "id,dmesr", "--seeds", "1,2", "--results", str(tmp_path)])
    md = (tmp_path / "tiny_sasrec.md").read_text().splitlines()
    for seed in (1, 2):
        for base, ref in (("", res["id", seed]["test"]), (":cm", res["id", seed]["content_match"]["test"])):
            row = next(r for r in md if r.startswith(f"| sasrec_ce_dmesr_s{seed} | sasrec_ce_id_s{seed}{base} |"))
            gap = res["dmesr", seed]["test"]["full"]["NDCG@10"] - ref["full"]["NDCG@10"]
            assert float(row.split(" | ")[3].split(" [")[0]) == pytest.approx(gap, abs=6e-5)  # printed to 4 places
