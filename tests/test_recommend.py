"""Using a trained run: `04_train_backbone.py DATA --recommend RUN` and stage4.recommend() give the top-k items of the
model's own scores for a history, seen items excluded (unless --keep-seen); bad input gets one clear error."""
import importlib
import json
import shutil

import numpy as np
import pytest
import torch

import common
from conftest import make_tiny_dataset, run_script
from test_backbone import fabricate_fused

stage4 = importlib.import_module("04_train_backbone")
TINY = dict(batch_size=16, hidden=16, lr=0.005, dropout=0.2, threads=1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny dataset with two runs: SASRec on IDs, and BERT4Rec on the dual view of a fixture fused.pt."""
    data = make_tiny_dataset(tmp_path_factory.mktemp("rec") / "tiny")
    stage4.train(stage4.Config(data=str(data), views="id", epochs=3, name="sas", **TINY))
    ds = common.load_dataset(data)
    common.save_artifact(data / "fused.pt", "fused", {"item_ids": ds.item_ids, **fabricate_fused(ds.n_items)},
                         {"fixture": "random BiCrossFusion"}, ds.fingerprint)
    stage4.train(stage4.Config(data=str(data), backbone="bert4rec", views="dual", epochs=1, name="bert", **TINY))
    return data


def reference(data, run, history: list[str], k: int, keep_seen: bool) -> list[tuple[str, float]]:
    """Top-k by the plainest route: the checkpoint rebuilt by hand, one unpadded history, every item's score, a sort."""
    ds = common.load_dataset(data)
    ckpt = common.load_artifact(data / "runs" / run / "model.pt", "backbone")
    cfg = stage4.Config(**ckpt["config"])
    fused = common.load_artifact(data / "fused.pt", "fused") if ckpt["views"] != ["id"] else None
    model = stage4.Recommender(cfg, ds.n_items, ckpt["views"], fused)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    seq = [ds.item_ids.index(i) + 1 for i in history]
    bert = cfg.backbone == "bert4rec"
    x = seq[-(cfg.max_len - bert):] + ([ds.n_items + 1] if bert else [])  # BERT4Rec: predict a mask after the history
    with torch.no_grad():
        s = model.table() @ model.states(torch.tensor([x]))[0, -1]
        if model.items.near:  # + the content residual (dual view): w x cosine to the last history item's nearest
            s = s + model.near_at(torch.tensor([seq[-1]]), torch.arange(1, ds.n_items + 1)[None])[0]
    if not keep_seen:
        s[torch.tensor(seq) - 1] = float("-inf")
    top = torch.argsort(s, descending=True)[:k].tolist()
    return [(ds.item_ids[i], float(s[i])) for i in top]


def items_of(row) -> list[tuple[str, float]]:
    return [(it["item_id"], it["score"]) for it in row["items"]]


def assert_same(got, want):
    assert [i for i, _ in got] == [i for i, _ in want]
    assert [s for _, s in got] == pytest.approx([s for _, s in want], abs=1e-5)


@pytest.mark.parametrize("run", ["sas", "bert"])
def test_recommend_is_the_top_k_of_the_models_scores_without_seen_items(trained, run):
    ds = common.load_dataset(trained)
    users = ["u3", "u17", "u42"]
    rows = stage4.recommend(trained, run, users=users, histories=[["i5", "i6", "i7"]], k=7)
    assert [r["user"] for r in rows] == users + [None] and rows[-1]["history"] == ["i5", "i6", "i7"]
    for u, row in zip(users, rows):
        history = [ds.item_ids[i - 1] for i in ds.seqs[ds.user_ids.index(u)]]  # the whole sequence
        assert_same(items_of(row), reference(trained, run, history, 7, keep_seen=False))
        assert not set(history) & {i for i, _ in items_of(row)}
        assert all(it["title"] == ds.items[ds.item_ids.index(it["item_id"])]["title"] for it in row["items"])
    assert_same(items_of(rows[-1]), reference(trained, run, ["i5", "i6", "i7"], 7, keep_seen=False))
    long = [f"i{j % 30}" for j in range(60)]  # longer than max_len: the backbone reads the most recent items
    kept = stage4.recommend(trained, run, users=users, histories=[long], k=7, keep_seen=True)
    for u, row in zip(users + [None], kept):
        history = [ds.item_ids[i - 1] for i in ds.seqs[ds.user_ids.index(u)]] if u else long
        assert_same(items_of(row), reference(trained, run, history, 7, keep_seen=True))
    everyone = stage4.recommend(trained, run, k=3)  # no users and no histories: every user, batched with padding
    assert [r["user"] for r in everyone] == ds.user_ids and all(len(r["items"]) == 3 for r in everyone)
    assert_same(items_of(everyone[3]), items_of(stage4.recommend(trained, run, users=["u3"], k=3)[0]))


def test_recommend_from_the_command_line_equals_the_function(trained, tmp_path):
    users_file = tmp_path / "users.txt"
    users_file.write_text("u9\n\nu10\n")
    p = run_script("04_train_backbone.py", trained, "--recommend", "sas", "--user", "u3", "u17", "--users-file",
                   users_file, "--history", "i5,i6,i7", "i1", "--k", "5")
    rows = [json.loads(line) for line in p.stdout.splitlines()]  # stdout holds only the JSON lines; logs go to stderr
    want = stage4.recommend(trained, "sas", users=["u3", "u17", "u9", "u10"], histories=[["i5", "i6", "i7"], ["i1"]],
                            k=5)
    assert [r["user"] for r in rows] == [r["user"] for r in want] and rows[-1]["history"] == ["i1"]
    for got, ref in zip(rows, want):  # scores may differ in the last float32 bit (other batch shape, thread count)
        assert_same(items_of(got), items_of(ref))
        assert [it["title"] for it in got["items"]] == [it["title"] for it in ref["items"]]
    run_script("04_train_backbone.py", trained, "--recommend", "sas", "--k", "4", "--out", tmp_path / "all.jsonl")
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    assert len(lines) == 80 and all(len(json.loads(line)["items"]) == 4 for line in lines)


def test_a_history_that_covers_the_catalogue_gets_only_the_items_left(trained):
    row = stage4.recommend(trained, "sas", histories=[[f"i{k}" for k in range(38)]], k=10)[0]
    assert sorted(i for i, _ in items_of(row)) == ["i38", "i39"]


def test_recommend_refuses_bad_input_with_one_clear_error(trained, tmp_path):
    with pytest.raises(common.ArtifactError, match=r"runs/nope/model.pt: not found.*runs with a model here: bert, sas"):
        stage4.recommend(trained, "nope")
    with pytest.raises(common.DatasetError, match=r"unknown user id 'zz'"):
        stage4.recommend(trained, "sas", users=["u1", "zz"])
    with pytest.raises(common.DatasetError, match=r"history 2: unknown item id 'i99'"):
        stage4.recommend(trained, "sas", histories=[["i1"], ["i2", "i99"]])
    other = make_tiny_dataset(tmp_path / "other")
    with open(other / "interactions.csv", "a") as f:
        f.write("u0,i3,5000\n")  # one more interaction: another dataset
    (other / "runs" / "sas").mkdir(parents=True)
    shutil.copy(trained / "runs" / "sas" / "model.pt", other / "runs" / "sas" / "model.pt")
    with pytest.raises(common.ArtifactError, match="made from another dataset"):
        stage4.recommend(other, "sas")
    # from the command line: the file and line of a bad user id, one `error:` line, no traceback, nothing on stdout
    bad = tmp_path / "users.txt"
    bad.write_text("u1\nnobody\n")
    p = run_script("04_train_backbone.py", trained, "--recommend", "sas", "--users-file", bad, check=False)
    assert p.returncode != 0 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (f"error: {bad}:2: unknown user id 'nobody' (not in "
                                                 f"{trained}/interactions.csv, 80 users)")
