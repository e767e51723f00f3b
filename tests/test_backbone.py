"""Stage 4 as a specification: no leak from the future, SDPA == plain attention, hand-computed metrics and ties,
fixed sampled negatives, model selection blind to test, every backbone end to end, and the dual-view plug-in."""
import csv
from pathlib import Path
import importlib
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import common
from conftest import ROOT, SHARED_DATA, run_script

stage4 = importlib.import_module("04_train_backbone")


def fabricate_fused(n_items, d_coarse=8, d_fine=12, d=16, T=5, seed=0):
    """A fused.pt payload built the way stage 3 builds it (random inputs through a random BiCrossFusion): a fixture."""
    fuse = importlib.import_module("03_fuse")
    g = torch.Generator().manual_seed(seed)
    cfg = {"d_coarse": d_coarse, "d_fine": d_fine, "d": d, "heads": 2}
    mod = fuse.BiCrossFusion(**cfg).eval()
    coarse = torch.randn(n_items, 3, d_coarse, generator=g)
    coarse_mask = torch.rand(n_items, 3, generator=g) < 0.8
    fine = torch.randn(n_items, T, d_fine, generator=g).half()
    fine_mask = torch.arange(T)[None] < torch.randint(1, T + 1, (n_items, 1), generator=g)
    with torch.no_grad():
        h_a, h_b = mod(coarse, coarse_mask, fine, fine_mask)
    return {"h_A": h_a, "h_B": h_b, "module_config": cfg, "module_state": mod.state_dict(),
            "inputs": {"coarse": coarse, "coarse_mask": coarse_mask, "fine": fine, "fine_mask": fine_mask},
            "variant": {"align": True, "cross": True}}


def random_batch(n_items, B=6, L=10, seed=0):
    """Right-aligned sequences of different lengths, one of them a single item."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, n_items + 1, (B, L), generator=g)
    lens = torch.tensor([L, L - 3, 1, 4, L - 1, 6][:B])
    return x.masked_fill(torch.arange(L)[None] < (L - lens)[:, None], 0)


def make_model(backbone, views=("id",), finetune=False, n_items=30, attention="sdpa", seed=0, residual=False):
    torch.manual_seed(seed)
    cfg = stage4.Config(data="", backbone=backbone, hidden=16, heads=2, blocks=2, max_len=12, attention=attention,
                        finetune_fusion=finetune, content_residual=residual)
    fused = fabricate_fused(n_items) if list(views) != ["id"] else None
    return stage4.Recommender(cfg, n_items, list(views), fused).eval()


# ---- no leakage from the future ----

@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
@pytest.mark.parametrize("views,finetune,residual", [(("id",), False, False), (("A", "B"), False, False),
                                                     (("A", "B"), True, False), (("A", "B"), False, True)])
def test_changing_item_t_plus_1_leaves_outputs_up_to_t_unchanged(backbone, views, finetune, residual):
    model = make_model(backbone, views, finetune, residual=residual)
    x = random_batch(30)
    with torch.no_grad():
        h = model.states(x)
        for t in range(x.shape[1] - 1):
            y = x.clone()
            y[:, t + 1] = torch.where(y[:, t + 1] > 0, y[:, t + 1] % 30 + 1, 0)  # a different item, padding stays
            h2 = model.states(y)
            torch.testing.assert_close(h2[:, :t + 1], h[:, :t + 1], rtol=0, atol=1e-6)
            changed = y[:, t + 1] != x[:, t + 1]
            if changed.any():  # and the future position itself does see the change
                assert (h2[changed, t + 1] - h[changed, t + 1]).abs().max() > 1e-4


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "bert4rec"])
def test_trimming_leading_padding_changes_nothing(backbone):
    """Batches are cut to their longest sequence; with padding masked and kept at zero that must be exact."""
    model = make_model(backbone)
    x = random_batch(30)
    x[:, :4] = 0  # the longest sequence now fills 6 of the 10 columns
    with torch.no_grad():
        full, cut = model.states(x), model.states(x[:, 4:])
    torch.testing.assert_close(full[:, 4:], cut, rtol=0, atol=1e-5)
    assert (full[x == 0] == 0).all()


# ---- one attention: SDPA and the plain masked softmax agree ----

@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_equals_plain_attention_including_fully_padded_rows(causal):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 2, 7, 8, generator=g) for _ in range(3))
    valid = torch.ones(4, 7, dtype=torch.bool)
    valid[1, :3] = False
    valid[2, :] = False  # a sequence that is all padding
    valid[3, :6] = False
    mask = stage4.attention_mask(valid, causal)
    a = stage4.attend(q, k, v, mask, 0.0, "sdpa")
    b = stage4.attend(q, k, v, mask, 0.0, "plain")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # and the mask is what the name says: a valid query sees valid keys only (earlier ones when causal), never padding
    m = mask[1, 0]
    assert not m[5, :3].any() and m[5, 3:6].all() and (m[5, 6] != causal)


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_backbone_outputs_match_between_attention_paths(backbone):
    x = random_batch(30)
    x[2] = 0  # an all-padding row
    with torch.no_grad():
        a = make_model(backbone, attention="sdpa").states(x)
        b = make_model(backbone, attention="plain").states(x)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---- ranking and metrics, by hand ----

def test_metrics_against_hand_computed_values():
    m = stage4.rank_metrics([1, 3, 7, 30])
    assert m["HR@5"] == pytest.approx(2 / 4) and m["HR@10"] == pytest.approx(3 / 4) and m["HR@20"] == pytest.approx(3 / 4)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(4)) / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(8)) / 4)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 7 + 1 / 30) / 4)


@pytest.mark.parametrize("chunk", [0, 1, 2, 3, 5])
def test_ties_count_against_the_target(chunk):
    # items 1..5 score 0.5, 0.9, 0.5, 0.1, 0.5 for the one user (d = 1, h = 1)
    table = torch.tensor([[0.5], [0.9], [0.5], [0.1], [0.5]])
    h = torch.ones(4, 1)
    target = torch.tensor([1, 2, 4, 5])
    # item 1: 1 + one higher (0.9) + two others equal = 4; item 2: 1; item 4: 5 (last); item 5: 4
    assert stage4.full_ranks(h, table, target, chunk).tolist() == [4, 1, 5, 4]
    # all scores equal (e.g. an untrained model with zero vectors): the target ranks last, never first
    assert stage4.full_ranks(torch.zeros(2, 1), table, torch.tensor([1, 3]), chunk).tolist() == [5, 5]
    negs = torch.tensor([[2, 3, 4], [1, 3, 4], [1, 2, 3], [1, 2, 3]])
    # item 5 (0.5) against items 1 (0.5), 2 (0.9), 3 (0.5): 1 + one higher + two equal = 4
    assert stage4.sampled_ranks(h, table, target, negs).tolist() == [3, 1, 4, 4]


def test_chunked_ranking_equals_unchunked_with_duplicate_items():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(50, 8, generator=g)
    table[10:20] = table[0]  # exact duplicates of item 1
    h = torch.randn(64, 8, generator=g)
    target = torch.randint(1, 51, (64,), generator=g)
    target[:8] = 1
    ref = stage4.full_ranks(h, table, target, 0)
    for chunk in (7, 16, 49):
        assert torch.equal(stage4.full_ranks(h, table, target, chunk), ref)


def test_chunked_ce_and_chunked_evaluation_train_the_same_model(tiny_dataset):
    """--ce-chunk / --eval-chunk bound memory by positions x chunk and users x chunk; they must not change results."""
    kw = dict(data=str(tiny_dataset), epochs=3, batch_size=16, hidden=16, dropout=0.0, views="id", threads=1)
    a = stage4.train(stage4.Config(name="plain", **kw))
    b = stage4.train(stage4.Config(name="chunked", ce_chunk=7, eval_chunk=9, eval_batch=13, **kw))
    for x, y in zip(a["curve"], b["curve"]):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["valid"]["full"] == pytest.approx(y["valid"]["full"], abs=1e-9)


# ---- sampled negatives ----

def test_bf16_autocast_trains_like_float32(tiny_dataset):
    """--amp runs the backbone under bf16 autocast (CPU autocast here; the GPU path is the same code) but keeps the loss
    in float32: the first epoch's loss matches float32 to bf16 precision, and the model learns as well."""
    kw = dict(data=str(tiny_dataset), epochs=4, batch_size=16, hidden=16, dropout=0.0, views="id", threads=1)
    a = stage4.train(stage4.Config(name="fp32", **kw))
    b = stage4.train(stage4.Config(name="amp", amp=True, **kw))
    assert b["curve"][0]["loss"] == pytest.approx(a["curve"][0]["loss"], rel=2e-2)
    assert b["curve"][0]["loss"] != a["curve"][0]["loss"]  # autocast really ran in bf16
    assert b["curve"][-1]["loss"] < b["curve"][0]["loss"]
    assert b["valid"]["full"]["NDCG@10"] > 0.5 * a["valid"]["full"]["NDCG@10"]


def test_sampled_negatives_are_fixed_distinct_and_never_the_users_items():
    rng = np.random.default_rng(0)
    seqs = [rng.choice(np.arange(1, 301), size=rng.integers(3, 150), replace=False) for _ in range(200)]
    a = stage4.sample_eval_negatives(seqs, 300, 100, seed=7)
    b = stage4.sample_eval_negatives(seqs, 300, 100, seed=7)
    assert a.shape == (200, 100) and np.array_equal(a, b)
    assert not np.array_equal(a, stage4.sample_eval_negatives(seqs, 300, 100, seed=8))
    for s, row in zip(seqs, a):
        assert len(np.unique(row)) == 100 and not np.isin(row, s).any() and row.min() >= 1 and row.max() <= 300
    # uniform over the allowed items: every allowed item is drawn about equally often across users
    counts = np.bincount(a.ravel(), minlength=301)[1:]
    allowed = np.array([sum(i not in set(s) for s in seqs) for i in range(1, 301)])
    expected = allowed * (a.size / allowed.sum())
    assert np.abs(counts - expected).max() < 6 * np.sqrt(expected.max())


def test_ce_loss_and_gradients_match_cross_entropy():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 8, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(23, 8, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(1, 24, (37,), generator=g)
    ref = torch.nn.functional.cross_entropy(h @ W.T, y - 1, reduction="sum")
    ref_g = torch.autograd.grad(ref * 0.3, (h, W))
    for chunk in (0, 5, 23):
        loss = stage4.ce_loss_sum(h, W, y, chunk)
        grads = torch.autograd.grad(loss * 0.3, (h, W))
        torch.testing.assert_close(loss, ref)
        for a, b in zip(grads, ref_g):
            torch.testing.assert_close(a, b)


def test_own_items_are_the_items_each_position_has_read_but_never_its_target():
    # two right-aligned rows; row 0 reads 3, 5, 3 then predicts 5 at its last position (a repeat: kept as a candidate)
    hist = torch.tensor([[3, 5, 3], [0, 7, 2]])
    tgt = torch.tensor([[5, 3, 5], [0, 2, 9]])
    r, c = stage4.own_items(hist, tgt, causal=True)
    pairs = sorted(zip(r.tolist(), (c + 1).tolist()))
    # positions row-major over non-padding targets: 0:(0,0) 1:(0,1) 2:(0,2) 3:(1,1) 4:(1,2)
    assert pairs == [(0, 3), (1, 5), (2, 3), (2, 3), (3, 7), (4, 2), (4, 7)]
    # BERT4Rec: every unmasked item of the row (mask token 10 and padding are no items), the target excepted
    hist_b, tgt_b = torch.tensor([[3, 10, 4]]), torch.tensor([[0, 5, 0]])
    r, c = stage4.own_items(hist_b, tgt_b, causal=False, mask_id=10)
    assert sorted((c + 1).tolist()) == [3, 4] and r.tolist() == [0, 0]
    # one target per row (evaluation): the whole history minus the target
    r, c = stage4.own_items(torch.tensor([[0, 4, 2], [1, 2, 3]]), torch.tensor([7, 3]), causal=False)
    assert sorted(zip(r.tolist(), (c + 1).tolist())) == [(0, 2), (0, 4), (1, 1), (1, 2)]


@pytest.mark.parametrize("chunk", [0, 1, 2, 3, 5])
def test_excluded_items_leave_the_full_ranking(chunk):
    # the table of test_ties_count_against_the_target: scores 0.5, 0.9, 0.5, 0.1, 0.5
    table = torch.tensor([[0.5], [0.9], [0.5], [0.1], [0.5]])
    h, target = torch.ones(4, 1), torch.tensor([1, 2, 4, 5])
    # user 0 has item 2 (0.9) in its history, user 2 items 1 and 3, user 3 item 5 only as its target (kept)
    exclude = stage4.own_items(torch.tensor([[0, 2], [0, 0], [1, 3], [0, 5]]), target, causal=False)
    # item 1 without item 2: 1 + items 3, 5 equal = 3; item 4 without items 1, 3: 1 + items 2, 5 = 3; item 5: as before
    assert stage4.full_ranks(h, table, target, chunk, exclude).tolist() == [3, 1, 3, 4]


def test_excluded_items_leave_the_softmax():
    """The loss with exclusions equals F.cross_entropy over scores set to -inf there, gradients included (the
    excluded entries get none), chunked or not."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(37, 8, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(23, 8, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(1, 24, (37,), generator=g)
    rows, cols = torch.randint(0, 37, (60,), generator=g), torch.randint(0, 23, (60,), generator=g)
    keep = cols != y[rows] - 1
    exclude = (rows[keep], cols[keep])
    s = (h @ W.T).index_put(exclude, torch.tensor(float("-inf"), dtype=torch.float64))
    ref = torch.nn.functional.cross_entropy(s, y - 1, reduction="sum")
    ref_g = torch.autograd.grad(ref * 0.3, (h, W))
    assert ref > 0 and ref < torch.nn.functional.cross_entropy(h @ W.T, y - 1, reduction="sum")
    for chunk in (0, 5, 23):
        loss = stage4.ce_loss_sum(h, W, y, chunk, exclude)
        grads = torch.autograd.grad(loss * 0.3, (h, W))
        torch.testing.assert_close(loss, ref)
        for a, b in zip(grads, ref_g):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_pop_adjust_adds_tau_log_popularity_to_the_training_scores_only(tiny_dataset, tmp_path, loss):
    """--pop-adjust tau: step_loss equals the plain loss over scores + tau * log(1 + training interactions of the item),
    popularity counted by hand from interactions.csv minus each user's last two items; tau = 0 is the plain loss."""
    cfg = stage4.Config(data=str(tiny_dataset), loss=loss, hidden=8, dropout=0.0, views="id", exclude_seen=False,
                        pop_adjust=0.7, threads=1)
    ds = common.load_dataset(tiny_dataset, check_images=False)
    data = stage4.build_data(cfg, ds)
    torch.manual_seed(0)
    model = stage4.Recommender(cfg, ds.n_items, ["id"], None).eval()
    run = stage4.Run(cfg, ds, data, ["id"], model, model, None, torch.device("cpu"), 0, 1, tmp_path)
    rows = np.arange(len(data.tr))
    neg = np.random.default_rng(0).integers(1, ds.n_items + 1, data.tr.shape)
    got = stage4.step_loss(run, rows, None, neg, 1.0)
    pop = np.zeros(ds.n_items + 1)
    for s in _read_seqs(tiny_dataset).values():
        for it in s[:-2]:
            pop[ds.item_ids.index(it) + 1] += 1
    prior = 0.7 * torch.log1p(torch.tensor(pop, dtype=torch.float32))
    x = torch.from_numpy(data.tr[:, -(int(data.tr_len.max()) + 1):])
    inp, tgt = x[:, :-1], x[:, 1:]
    pos = inp != 0
    h, vecs = model(inp, True)
    h, t = h[pos], tgt[pos]
    s = h @ model.table(vecs).T + prior[1:]
    if loss == "ce":
        ref = torch.nn.functional.cross_entropy(s, t - 1, reduction="sum")
    else:
        n = torch.from_numpy(neg[:, -inp.shape[1]:])[pos]
        ref = torch.nn.functional.softplus(-s[torch.arange(len(t)), t - 1]).sum() \
            + torch.nn.functional.softplus(s[torch.arange(len(t)), n - 1]).sum()
    torch.testing.assert_close(got, ref)
    # tau = 0 is the plain loss over the model's own scores (what evaluation ranks): no prior in them
    run.cfg = stage4.Config(**{**cfg.__dict__, "pop_adjust": 0.0})
    off = stage4.step_loss(run, rows, None, neg, 1.0)
    s0 = h @ model.table(vecs).T
    if loss == "ce":
        ref0 = torch.nn.functional.cross_entropy(s0, t - 1, reduction="sum")
    else:
        ref0 = torch.nn.functional.softplus(-s0[torch.arange(len(t)), t - 1]).sum() \
            + torch.nn.functional.softplus(s0[torch.arange(len(t)), n - 1]).sum()
    torch.testing.assert_close(off, ref0)
    assert abs((off - got).item()) > 1e-3


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec"])
def test_exclude_seen_trains_and_ranks_without_the_users_items(tiny_dataset, backbone):
    """--exclude-seen: the training loss is lower at the same weights (fewer competitors), evaluation never ranks a
    user's own item above the target, and the run states the protocol."""
    kw = dict(data=str(tiny_dataset), epochs=2, batch_size=16, hidden=16, dropout=0.0, views="id", threads=1,
              backbone=backbone, content_grid="")
    a = stage4.train(stage4.Config(name="all", exclude_seen=False, **kw))
    b = stage4.train(stage4.Config(name="ex", **kw))
    assert b["curve"][0]["loss"] < a["curve"][0]["loss"]
    assert "own earlier items excluded" in b["protocol"]["full"] and "excluded too" not in a["protocol"]["full"]
    # the same weights ranked both ways: exclusion can only lift the target
    cfg = stage4.Config(**kw)
    ds = common.load_dataset(tiny_dataset, check_images=False)
    data = stage4.build_data(cfg, ds)
    model, _, _ = stage4.load_trained(tiny_dataset, "all", device="cpu")
    bert = backbone == "bert4rec"
    plain, _ = stage4.evaluate(model, *data.test, cfg, torch.device("cpu"), bert)
    ex, _ = stage4.evaluate(model, *data.test, cfg, torch.device("cpu"), bert, seen=data.test_seen)
    n_own = np.array([len(set(ds.seqs[u][:-1]) - {ds.seqs[u][-1]}) for u in data.eval_users])
    assert (ex <= plain).all() and (ex >= 1).all() and (plain - ex <= n_own).all() and (ex < plain).any()


# ---- model selection never reads test ----

def _read_seqs(root):
    seqs = {}
    with open(root / "interactions.csv") as f:
        for row in csv.DictReader(f):
            seqs.setdefault(row["user_id"], []).append(row["item_id"])
    return seqs


@pytest.mark.parametrize("loss", ["ce", "bce"])  # selected on full-ranking / on sampled-100 validation
def test_model_selection_never_reads_test(tiny_dataset, tmp_path, loss):
    from conftest import write_dataset
    seqs = _read_seqs(tiny_dataset)
    items = [json.loads(line) for line in open(tiny_dataset / "items.jsonl")]
    rng = np.random.default_rng(5)
    garbage = {u: s[:-1] + [f"i{rng.integers(40)}"] for u, s in seqs.items()}  # test targets replaced
    other = write_dataset(tmp_path / "garbage", garbage, items)
    runs = []
    for root in (tiny_dataset, other):
        cfg = stage4.Config(data=str(root), loss=loss, hidden=16, epochs=5, patience=3, batch_size=16, views="id",
                            seed=3, threads=1)
        runs.append(stage4.train(cfg))
    a, b = runs
    assert a["config"]["select"] == {"ce": "full", "bce": "sampled"}[loss]
    assert a["best_epoch"] == b["best_epoch"]
    # both protocols: the sampled validation negatives do not depend on the test item either
    assert [r["valid"] for r in a["curve"]] == [r["valid"] for r in b["curve"]]
    assert [r["loss"] for r in a["curve"]] == [r["loss"] for r in b["curve"]]
    assert a["test"]["full"] != b["test"]["full"]  # the test itself did change


@pytest.mark.parametrize("select", ["full", "sampled"])
def test_best_epoch_and_early_stop_follow_the_selected_protocol(tiny_dataset, select):
    cfg = stage4.Config(data=str(tiny_dataset), loss="bce", select=select, hidden=16, epochs=12, patience=2,
                        batch_size=16, lr=0.005, dropout=0.2, views="id", threads=1, name=f"sel_{select}")
    res = stage4.train(cfg)
    key = stage4.SELECT[select]
    score = [r["valid"][key]["NDCG@10"] for r in res["curve"]]
    assert res["best_epoch"] == 1 + int(np.argmax(score))  # the first epoch with the best score
    assert res["valid"] == res["curve"][res["best_epoch"] - 1]["valid"]
    if len(score) < 12:  # stopped early: exactly `patience` evaluations after the best one
        assert len(score) == res["best_epoch"] + 2
    assert key in res["protocol"]["selection"]


# ---- end to end, as a user runs it ----

FAST = ["--batch-size", "16", "--hidden", "16", "--lr", "0.005", "--dropout", "0.2", "--threads", "1"]


def test_sasrec_end_to_end_from_the_command_line(tiny_dataset):
    run_script("04_train_backbone.py", tiny_dataset, "--epochs", "6", "--name", "e2e", *FAST)
    out = tiny_dataset / "runs" / "e2e"
    res = json.loads((out / "results.json").read_text())
    assert res["backbone"] == "sasrec" and res["loss"] == "ce" and res["views"] == "id" and res["seed"] == 42
    assert len(res["curve"]) == 6 and 1 <= res["best_epoch"] <= 6
    for proto in ("full", "sampled100"):
        m = res["test"][proto]
        assert set(m) == {"HR@5", "HR@10", "HR@20", "NDCG@5", "NDCG@10", "NDCG@20", "MRR"}
        assert 0 <= m["NDCG@10"] <= m["HR@10"] <= m["HR@20"] <= 1
    assert res["test"]["full"]["HR@10"] > 0.4  # the next-item pattern is learnt: chance is 10 / 40
    g = res["test"]["groups"]
    assert g["head_items"]["users"] + g["tail_items"]["users"] == 80
    assert g["short_users"]["users"] + g["long_users"]["users"] == 80
    assert res["dataset"]["fingerprint"] == common.load_dataset(tiny_dataset).fingerprint
    ckpt = common.load_artifact(out / "model.pt", "backbone", fingerprint=res["dataset"]["fingerprint"])
    assert ckpt["best_epoch"] == res["best_epoch"] and ckpt["config"]["backbone"] == "sasrec"


def test_gru4rec_and_bert4rec_learn(tiny_dataset):
    kw = dict(data=str(tiny_dataset), batch_size=16, hidden=16, lr=0.005, dropout=0.2, threads=1, views="id")
    gru = stage4.train(stage4.Config(backbone="gru4rec", loss="ce", epochs=6, name="gru", **kw))
    assert gru["test"]["full"]["HR@10"] > 0.4
    bert = stage4.train(stage4.Config(backbone="bert4rec", loss="bce", epochs=30, mask_prob=0.3, name="bert", **kw))
    first = bert["curve"][0]["valid"]["full"]["NDCG@10"]
    assert bert["valid"]["full"]["NDCG@10"] > 1.5 * first  # slower on 80 users, but the cloze task is learnt
    assert (tiny_dataset / "runs" / "bert" / "results.json").is_file()


@pytest.mark.parametrize("backbone,flag,expected", [("sasrec", -1.0, 0.6), ("gru4rec", -1.0, 0.5),
                                                      ("bert4rec", -1.0, 0.5), ("gru4rec", 0.3, 0.3)])
def test_default_dropout_is_the_backbones_own_and_recorded(backbone, flag, expected):
    cfg = stage4.Config(data="unused", backbone=backbone, dropout=flag, views="id")
    stage4.resolve_views(cfg)  # Config resolves -1 itself; the checks before training leave it; results.json stores cfg
    assert cfg.dropout == expected and cfg.lr == stage4.LR[backbone] == (2e-3 if backbone == "gru4rec" else 1e-3)
    model = stage4.Recommender(stage4.Config(backbone=backbone, dropout=flag), 10, ["id"], None)
    assert {m.p for m in model.backbone.modules() if isinstance(m, torch.nn.Dropout)} == {expected}


@pytest.mark.parametrize("backbone,flag,scale", [("sasrec", -1.0, 0.1), ("gru4rec", -1.0, 1.0),
                                                 ("bert4rec", -1.0, 1.0), ("sasrec", 1.0, 1.0)])
def test_init_scale_is_the_backbones_own(backbone, flag, scale):
    torch.manual_seed(0)
    cfg = stage4.Config(backbone=backbone, init_scale=flag, hidden=64)
    assert cfg.init_scale == scale  # resolved in Config, so results.json records it
    model = stage4.Recommender(cfg, 5000, ["id"], None)
    emb = model.items.emb.weight[1:]
    assert emb.std().item() == pytest.approx(scale / 8, rel=0.02) and not model.items.emb.weight[0].any()
    if backbone != "gru4rec":  # positions at the scale of the sqrt(hidden)-scaled item part of the input
        assert model.backbone.pos.weight.std().item() == pytest.approx(scale, rel=0.1)


def test_dual_view_end_to_end_with_fusion_finetuning(tiny_dataset):
    ds = common.load_dataset(tiny_dataset)
    payload = {"item_ids": ds.item_ids, **fabricate_fused(ds.n_items)}
    common.save_artifact(tiny_dataset / "fused.pt", "fused", payload, {"fixture": "random BiCrossFusion"},
                         ds.fingerprint)
    before = payload["module_state"]
    run_script("04_train_backbone.py", tiny_dataset, "--epochs", "2", "--finetune-fusion", "--no-whiten",
               "--name", "dual", *FAST)
    res = json.loads((tiny_dataset / "runs" / "dual" / "results.json").read_text())
    assert res["views"] == "dual" and res["fused"].endswith("fused.pt")  # dual is the default once fused.pt exists
    state = common.load_artifact(tiny_dataset / "runs" / "dual" / "model.pt", "backbone")["state_dict"]
    tuned = {k[len("items.fusion."):]: v for k, v in state.items() if k.startswith("items.fusion.")}
    assert tuned.keys() == before.keys()
    assert any(not torch.equal(tuned[k], before[k]) for k in before)  # the fusion module was trained end to end


# ---- the real data (slow) ----

# Both Beauty runs are capped at an epoch budget that CI can afford: started side by side, one thread each, they take
# about 32 minutes on a 2-core AVX2-only EPYC (both floors below were measured there, this way). Run to convergence,
# the same defaults give test NDCG@10 0.0563 (ce, best epoch 38) and sampled-100 HR@10 0.4726 (bce, best epoch 188).
BEAUTY_RUNS = {"ce": ("--epochs", "40"), "bce": ("--loss", "bce", "--epochs", "120")}


@pytest.fixture(scope="module")
def beauty_run(tmp_path_factory):
    """The canonical Beauty set from ../shared/data and every BEAUTY_RUNS stage-4 run started at once (the defaults,
    `--views id`, one thread each: the exact configuration of the measured runs, since CPU float sums depend on the
    thread count); returns a function that waits for one run and returns its results.json."""
    src = SHARED_DATA / "amazon"
    if not (src / "Beauty.txt").is_file():
        pytest.skip(f"real data not found at {src} (../shared/data is only on the development machines)")
    data = tmp_path_factory.mktemp("real") / "beauty"
    run_script("data/prepare.py", "beauty", "--out", data)
    procs = {}
    for name, flags in BEAUTY_RUNS.items():
        log = open(data / f"{name}.log", "w")  # a file, not a pipe: tqdm writes more than a pipe holds unread
        cmd = [sys.executable, str(ROOT / "04_train_backbone.py"), str(data), "--views", "id", "--name", name,
               "--threads", "1", *flags]
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1")), log)

    def result(name: str) -> dict:
        proc, log = procs[name]
        if proc.wait(timeout=3600) != 0:
            raise AssertionError(f"Beauty run {name} exited {proc.returncode}\n"
                                 f"{(data / f'{name}.log').read_text()[-4000:]}")
        return json.loads((data / "runs" / name / "results.json").read_text())

    yield result
    for proc, log in procs.values():  # a run whose test was deselected or failed early must not outlive the session
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.slow
def test_sasrec_ce_on_real_beauty_reaches_published_level(beauty_run):
    res = beauty_run("ce")
    # Measured at this budget (40 epochs), seed 42, one thread: test NDCG@10 0.0562, HR@10 0.0914 (best epoch 38, as
    # without the cap). With the user's own items left as candidates (--no-exclude-seen) and no cap, 0.0414 / 0.0842:
    # the top of the published SASRec range on this file (0.0327-0.0416). The floor sits a little below the
    # measurement, so a change that costs accuracy (e.g. the per-batch loss mean that gave 0.0349 / 0.0715 at
    # convergence) fails here.
    assert res["epochs_run"] <= 40 and res["config"]["loss"] == "ce"
    assert res["test"]["full"]["NDCG@10"] >= 0.054 and res["test"]["full"]["HR@10"] >= 0.088


@pytest.mark.slow
def test_sasrec_bce_on_real_beauty_reaches_the_sasrec_paper_recipe_level(beauty_run):
    res = beauty_run("bce")
    # Measured at this budget (120 epochs), seed 42, one thread: sampled-100 HR@10 0.4745 (best epoch 119), chosen on
    # sampled-100 validation; without the cap, on another CPU, 0.4726 (epoch 188; the SASRec paper reports 0.4854 on
    # its larger Beauty file), and 0.4638 before SASRec's init scale 0.1.
    assert res["config"]["select"] == "sampled" and res["epochs_run"] <= 120
    assert res["test"]["sampled100"]["HR@10"] >= 0.465


def test_sweep_runs_in_parallel_and_shows_validation_only(tiny_dataset):
    """bench/sweep.py: one stage-4 run per flag set, a table sorted by validation NDCG@10 and no test column (defaults
    chosen by test would make every later test figure optimistic)."""
    base = "--views id --epochs 3 --hidden 16 --batch-size 16 --threads 1"
    out = run_script("bench/sweep.py", tiny_dataset, "--jobs", "2", "--tag", "t", "--base", base, "", "--dropout 0.1")
    rows = [line for line in out.stdout.splitlines() if line.startswith("| `")]
    assert len(rows) == 2 and "test" not in out.stdout.split("| flags")[1].lower()
    assert all(r.split("|")[2].strip() == "full" for r in rows)  # ce runs select on full ranking
    valid = [float(r.split("|")[3]) for r in rows]
    assert valid == sorted(valid, reverse=True)
    for name, dropout in [("sweep_t_defaults", stage4.DROPOUT["sasrec"]), ("sweep_t_dropout_0.1", 0.1)]:
        res = json.loads((tiny_dataset / "runs" / name / "results.json").read_text())
        assert res["config"]["dropout"] == dropout and res["config"]["hidden"] == 16
        assert f"{res['valid']['full']['NDCG@10']:.4f}" in out.stdout


# ---- the plug-in's levers (EVIDENCE.md): conditioning, PCA start, ID gate, content-only view, content match ----

def write_semantics(root: Path, seed=0, E=12) -> dict:
    """A stage-1-shaped semantics.pt fixture for `root` (random vectors, items of one family close together)."""
    ds = common.load_dataset(root)
    g = torch.Generator().manual_seed(seed)
    family = torch.randn(5, E, generator=g)
    base = torch.stack([family[k % 5] for k in range(ds.n_items)]) + 0.3 * torch.randn(ds.n_items, E, generator=g)
    view_mask = torch.rand(ds.n_items, 3, generator=g) < 0.7
    payload = {"item_ids": ds.item_ids, "view_emb": (base[:, None] + 0.1 * torch.randn(ds.n_items, 3, E, generator=g)),
               "view_mask": view_mask, "text_pooled": torch.nn.functional.normalize(base, dim=-1).half()}
    common.save_artifact(root / "semantics.pt", "semantics", payload, {"fixture": "random"}, ds.fingerprint)
    return payload


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "bert4rec"])
@pytest.mark.parametrize("k", [29, 4])
def test_content_residual_adds_w_times_the_cosine_to_the_last_item(backbone, k):
    """--content-residual: score = the d-wide views' dot product + w * cosine(centred content of the candidate, of the
    last item read) for the candidate among that item's k nearest (else + 0); for BERT4Rec the last history item (left
    of the mask). Checked by hand against the model's own scores through every ranking path."""
    model = make_model(backbone, ("A", "B"), residual=True)
    model.items.near_ids, model.items.near_cos = (t.clone() for t in stage4.nearest(model.items.h_B[1:31], k))
    pad = lambda t: torch.cat([t.new_zeros(1, t.shape[1]), t, t.new_zeros(1, t.shape[1])])
    model.items.near_ids, model.items.near_cos = pad(model.items.near_ids), pad(model.items.near_cos)
    with torch.no_grad():
        model.items.near_weight.fill_(2.5)
    hist = random_batch(30).numpy()
    with torch.no_grad():
        h = stage4.last_states(model, hist, model.all_vectors(), torch.device("cpu"), backbone == "bert4rec")
        base = h @ model.table().T
    c = model.items.h_B[1:31]  # view B's frozen table, as its adapter reads it
    c = torch.nn.functional.normalize(c - c.mean(0), dim=1)
    cos = c @ c.T
    cos.fill_diagonal_(float("-inf"))
    kth = cos.topk(k, dim=1).values[:, -1:]
    near = torch.where(cos >= kth, cos, torch.zeros(()))  # the k nearest other items keep their cosine, others 0
    last = torch.from_numpy(hist[:, -1])
    want = base + 2.5 * near[last - 1]
    with torch.no_grad():
        got = stage4.add_at(base.clone(), model.near_add(last))
        torch.testing.assert_close(got, want)
        cand = torch.randint(1, 31, (len(last), 7))
        torch.testing.assert_close(model.near_at(last, cand), 2.5 * near[last - 1].gather(1, cand - 1))
        # ranks: chunked == unchunked == by hand (ties against the target)
        t = torch.randint(1, 31, (len(last),))
        ref = 1 + (want > want.gather(1, t[:, None] - 1)).sum(1) + (want == want.gather(1, t[:, None] - 1)).sum(1) - 1
        for chunk in (0, 7):
            assert torch.equal(stage4.full_ranks(h, model.table(), t, chunk, None, model.near_add(last)), ref)
    assert not make_model(backbone, ("id",), residual=True).items.near  # the plain backbone has no content view


def test_content_residual_loss_and_weight_gradient_match_cross_entropy():
    """SoftmaxCE with sparse added terms == F.cross_entropy over the dense scores + those terms, gradients (also of the
    terms' values, which carry w's) included, chunked or not."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(37, 8, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(23, 8, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(1, 24, (37,), generator=g)
    rows = torch.arange(37).repeat_interleave(5)
    cols = torch.stack([torch.randperm(23, generator=g)[:5] for _ in range(37)]).flatten()
    w = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    vals = torch.rand(len(rows), dtype=torch.float64, generator=g)
    ex = (torch.arange(37), (y - 1 + 3) % 23)  # one excluded item per row, never the target
    dense = torch.zeros(37, 23, dtype=torch.float64).index_put((rows, cols), vals)
    s = (h @ W.T + w * dense).index_put(ex, torch.tensor(float("-inf"), dtype=torch.float64))
    ref = torch.nn.functional.cross_entropy(s, y - 1, reduction="sum")
    ref_g = torch.autograd.grad(ref * 0.3, (h, W, w))
    for chunk in (0, 5):
        loss = stage4.ce_loss_sum(h, W, y, chunk, ex, (rows, cols, w * vals))
        torch.testing.assert_close(loss, ref)
        for a, b in zip(torch.autograd.grad(loss * 0.3, (h, W, w)), ref_g):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backbone,loss", [("sasrec", "ce"), ("gru4rec", "bce"), ("bert4rec", "ce")])
def test_content_residual_trains_its_weight_end_to_end(tiny_dataset, backbone, loss):
    write_semantics(tiny_dataset)
    cfg = stage4.Config(data=str(tiny_dataset), backbone=backbone, loss=loss, views="dual", semantic="raw",
                        content_residual=True, hidden=8, epochs=2, batch_size=16, threads=1, content_grid="0,1",
                        name="cr")
    out = stage4.train(cfg)
    model, _, _ = stage4.load_trained(tiny_dataset, "cr", "cpu")
    assert model.items.near and model.items.near_weight.item() != 1.0  # trained, saved, reloaded
    assert out["curve"][-1]["near_weight"] != 1.0  # and logged per epoch
    assert np.isfinite(out["test"]["full"]["NDCG@10"])


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_residual_lags_add_one_weighted_cosine_per_item_read_back(tiny_dataset, tmp_path, loss):
    """--residual-lags 3: position t's scores get sum_j w_j * cos(candidate, item read at t - j), j < 3, each cosine
    kept for the k nearest only, nothing before the sequence starts; written out densely by hand for the training loss
    (ce and bce) and for evaluation's right-aligned histories (near_add and near_at). The gradient reaches every w_j."""
    payload = write_semantics(tiny_dataset)
    cfg = stage4.Config(data=str(tiny_dataset), loss=loss, hidden=8, dropout=0.0, views="dual", semantic="raw",
                        exclude_seen=False, residual_k=5, residual_lags=3, threads=1)
    ds = common.load_dataset(tiny_dataset, check_images=False)
    data = stage4.build_data(cfg, ds)
    torch.manual_seed(0)
    model = stage4.Recommender(cfg, ds.n_items, ["A", "B"], None, payload, data.pop[1:]).eval()
    with torch.no_grad():
        model.items.near_weight.fill_(2.0)
        model.items.near_lag_weight.copy_(torch.tensor([1.5, -0.5]))
    w = [2.0, 1.5, -0.5]
    run = stage4.Run(cfg, ds, data, ["A", "B"], model, model, None, torch.device("cpu"), 0, 1, tmp_path)
    rows = np.arange(len(data.tr))
    neg = np.random.default_rng(0).integers(1, ds.n_items + 1, data.tr.shape)
    got = stage4.step_loss(run, rows, None, neg, 1.0)
    N = ds.n_items
    dense = torch.zeros(N + 2, N + 1).scatter_(1, model.items.near_ids, model.items.near_cos)[:, 1:]  # row 0: zeros
    assert (dense > 0).sum(1)[1:N + 1].eq(5).all()  # k = 5 neighbours per item
    x = torch.from_numpy(data.tr[:, -(int(data.tr_len.max()) + 1):])
    inp, tgt = x[:, :-1], x[:, 1:]
    pos = inp != 0
    h, vecs = model(inp, True)
    s = h @ model.table(vecs).T
    add = torch.zeros_like(s)
    B, L = inp.shape
    for b in range(B):
        for t in range(L):
            for j in range(3):
                if t - j >= 0:
                    add[b, t] += w[j] * dense[inp[b, t - j]]
    s = (s + add)[pos]
    t = tgt[pos]
    if loss == "ce":
        ref = torch.nn.functional.cross_entropy(s, t - 1, reduction="sum")
    else:
        n = torch.from_numpy(neg[:, -L:])[pos]
        ref = torch.nn.functional.softplus(-s[torch.arange(len(t)), t - 1]).sum() \
            + torch.nn.functional.softplus(s[torch.arange(len(t)), n - 1]).sum()
    torch.testing.assert_close(got, ref)
    got.backward()
    assert model.items.near_weight.grad != 0 and model.items.near_lag_weight.grad.ne(0).all()
    # evaluation: right-aligned histories, the last three items most recent first (a one-item history has one)
    hist = random_batch(N, L=6).numpy()
    last = stage4.recent(hist, 3)
    assert torch.equal(last, torch.from_numpy(hist[:, ::-1][:, :3].copy()))
    want = sum(w[j] * dense[last[:, j]] for j in range(3))
    with torch.no_grad():
        assert torch.allclose(stage4.add_at(torch.zeros(len(hist), N), model.near_add(last)), want)
        cand = torch.randint(1, N + 1, (len(hist), 7))
        assert torch.allclose(model.near_at(last, cand), want.gather(1, cand - 1))
        assert torch.allclose(model.near_at(last, torch.arange(1, N + 1).expand(len(hist), -1)), want)
    with pytest.raises(SystemExit, match="residual-lags"):
        stage4.resolve_views(stage4.Config(data=str(tiny_dataset), views="dual", residual_lags=0))


@pytest.mark.parametrize("flag", ["residual_rare", "residual_query"])
def test_residual_rare_and_query_weigh_the_cosines_by_training_rarity(tiny_dataset, tmp_path, flag):
    """--residual-rare: the residual's cosine to candidate c weighs w_j x (1 + u x rarity_c); --residual-query: the
    terms from the item read j steps back weigh w_j x (1 + u x rarity of that item). rarity = 1 - log(1 + pop) / log(1
    + max pop) from training interactions only (the validation and test items do not count); u starts at 0 (the plain
    residual), is learned, and the training loss and evaluation see the same term."""
    payload = write_semantics(tiny_dataset)
    cfg = stage4.Config(data=str(tiny_dataset), hidden=8, dropout=0.0, views="dual", semantic="raw",
                        exclude_seen=False, residual_k=5, residual_lags=2, threads=1, **{flag: True})
    ds = common.load_dataset(tiny_dataset, check_images=False)
    data = stage4.build_data(cfg, ds)
    N = ds.n_items
    torch.manual_seed(0)
    model = stage4.Recommender(cfg, ds.n_items, ["A", "B"], None, payload, data.pop[1:]).eval()
    pop = np.bincount(np.concatenate([s[:-2] for s in ds.seqs]), minlength=N + 1)[1:]  # training part only
    lp = np.log1p(pop)
    torch.testing.assert_close(model.items.rarity[1:N + 1], torch.from_numpy(1 - lp / lp.max()).float())
    assert model.items.rarity[0] == 0 and model.items.rarity[N + 1] == 0
    hist = random_batch(N, L=6).numpy()
    last = stage4.recent(hist, 2)
    dense = torch.zeros(N + 2, N + 1).scatter_(1, model.items.near_ids, model.items.near_cos)[:, 1:]
    u = model.items.near_rare if flag == "residual_rare" else model.items.near_query
    with torch.no_grad():
        plain = stage4.add_at(torch.zeros(len(hist), N), model.near_add(last))  # u = 0: the plain residual
        torch.testing.assert_close(plain, 1.0 * dense[last[:, 0]] + 0.5 * dense[last[:, 1]])
        u.fill_(3.0)
        if flag == "residual_rare":
            want = plain * (1 + 3.0 * model.items.rarity[1:N + 1])
        else:
            r = lambda j: 1 + 3.0 * model.items.rarity[last[:, j]][:, None]
            want = 1.0 * r(0) * dense[last[:, 0]] + 0.5 * r(1) * dense[last[:, 1]]
        torch.testing.assert_close(stage4.add_at(torch.zeros(len(hist), N), model.near_add(last)), want)
        cand = torch.randint(1, N + 1, (len(hist), 7))
        torch.testing.assert_close(model.near_at(last, cand), want.gather(1, cand - 1))
    run = stage4.Run(cfg, ds, data, ["A", "B"], model.train(), model, None, torch.device("cpu"), 0, 1, tmp_path)
    stage4.step_loss(run, np.arange(len(data.tr)), None, None, 1.0).backward()
    assert u.grad != 0
    plain_cfg = stage4.Config(data=str(tiny_dataset), hidden=8, views="dual", semantic="raw")
    items = stage4.Recommender(plain_cfg, N, ["A", "B"], None, payload, data.pop[1:]).items
    assert not items.rare and not items.query


@pytest.mark.parametrize("id_free", ["B", ""])
def test_id_align_adds_the_symmetric_infonce_of_adapter_outputs_and_id_vectors(tiny_dataset, tmp_path, id_free):
    """--id-align lam: step_loss = the loss without it + lam x the mean over content views of the symmetric InfoNCE
    between adapter(content_i) and the ID vector of item i (the first view with an ID part) over the batch's distinct
    targets, written out by hand with cross_entropy; the gradient reaches the adapters and the ID table."""
    payload = write_semantics(tiny_dataset)
    cfg = stage4.Config(data=str(tiny_dataset), hidden=8, dropout=0.0, views="dual", semantic="raw", id_free=id_free,
                        id_align=0.3, id_align_tau=0.07, content_residual=False, threads=1)
    ds = common.load_dataset(tiny_dataset, check_images=False)
    data = stage4.build_data(cfg, ds)
    torch.manual_seed(0)
    model = stage4.Recommender(cfg, ds.n_items, ["A", "B"], None, payload, data.pop[1:]).eval()
    run = stage4.Run(cfg, ds, data, ["A", "B"], model, model, None, torch.device("cpu"), 0, 1, tmp_path)
    rows = np.arange(len(data.tr))
    got = stage4.step_loss(run, rows, None, None, 1.0)
    run.cfg = stage4.Config(**{**cfg.__dict__, "id_align": 0.0})
    plain = stage4.step_loss(run, rows, None, None, 1.0)
    x = torch.from_numpy(data.tr[:, -(int(data.tr_len.max()) + 1):])
    t = x[:, 1:][x[:, :-1] != 0].unique()
    e = model.items.emb.weight[t, :8]  # view A's ID block: A has an ID part in both settings
    F = torch.nn.functional
    ref = 0
    for k, v in enumerate("AB"):
        z = model.items.adapters[k](getattr(model.items, "h_" + v)[t])
        logits = F.normalize(z, dim=-1) @ F.normalize(e, dim=-1).T / 0.07
        y = torch.arange(len(t))
        ref = ref + 0.5 * (F.cross_entropy(logits, y) + F.cross_entropy(logits.T, y))
    torch.testing.assert_close(got, plain + 0.3 * ref / 2)
    (got - plain).backward()
    assert model.items.adapters[1].weight.grad.abs().sum() > 0 and model.items.emb.weight.grad[t, :8].abs().sum() > 0
    with pytest.raises(SystemExit, match="no view"):  # nothing to align with
        stage4.resolve_views(stage4.Config(data=str(tiny_dataset), views="dual", id_free="A,B", id_align=1.0))


def test_whitening_gives_unit_covariance_and_pca_the_top_axes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.diag(torch.tensor([9.0, 5, 2, 1, .5, .1],
                                                                                        dtype=torch.float64)) + 3
    w = stage4.whiten(x)
    assert torch.allclose(w.mean(0), torch.zeros(6, dtype=w.dtype), atol=1e-9)
    assert torch.allclose(torch.cov(w.T), torch.eye(6, dtype=w.dtype), atol=1e-6)
    p = stage4.pca(x, 3)
    var = p.var(0)
    evals = torch.linalg.eigvalsh(torch.cov(x.T)).flip(0)[:3]  # the top three eigenvalues, largest first
    assert torch.allclose(var, evals, rtol=1e-6) and torch.allclose(torch.cov(p.T), torch.diag(var), atol=1e-6)
    assert stage4.pca(x[:, :2], 4)[:, 2:].abs().max() == 0  # fewer axes than asked: zero columns
    assert stage4.whiten(torch.cat([x, x[:, :1]], 1)).shape[1] == 6  # a repeated column is dropped, not inf


def test_id_free_view_and_popularity_gate(tiny_dataset):
    payload = write_semantics(tiny_dataset)
    ds = common.load_dataset(tiny_dataset)
    pop = np.arange(ds.n_items) % 4  # items with 0 training interactions get no ID part at all
    cfg = stage4.Config(data=str(tiny_dataset), hidden=8, semantic="raw", id_free="B", id_gate=2.0)
    model = stage4.Recommender(cfg, ds.n_items, ["A", "B"], None, payload, pop)
    ids = torch.arange(1, ds.n_items + 1)
    with torch.no_grad():
        before = model.items(ids)
        model.items.emb.weight.add_(1.0)
        after = model.items(ids)
    moved = (after - before).abs().amax(-1)  # [N, V]
    assert moved[:, 1].max() == 0  # B is content only
    assert torch.allclose(moved[:, 0], torch.as_tensor(pop / (pop + 2.0), dtype=moved.dtype))  # A: gated ID part


def test_id_dropout_drops_whole_items_in_training_only(tiny_dataset):
    payload = write_semantics(tiny_dataset)
    ds = common.load_dataset(tiny_dataset)
    cfg = stage4.Config(data=str(tiny_dataset), hidden=8, semantic="raw", id_free="", id_dropout=0.5)
    model = stage4.Recommender(cfg, ds.n_items, ["A", "B"], None, payload, np.ones(ds.n_items))
    ids = torch.arange(1, ds.n_items + 1)
    with torch.no_grad():
        content = torch.stack([a(h) for a, h in zip(model.items.adapters, model.items.content(ids))], -2)
        full = content + model.items.emb(ids).view(len(ids), 2, 8)
        assert torch.equal(model.eval().items(ids), full)  # evaluation: every ID part, nothing random
        torch.manual_seed(0)
        got = model.train().items(torch.cat([ids, ids]))  # each item twice in one call
    first, second = got[:len(ids)], got[len(ids):]
    assert torch.equal(first, second)  # one draw per item, not per occurrence
    is_content = (first == content).all(-1).all(-1)  # both views lose the ID part together
    assert torch.equal(first[~is_content], full[~is_content])  # the others keep it whole, not rescaled
    assert 0.2 * len(ids) < is_content.sum() < 0.8 * len(ids)
    plain = stage4.Recommender(stage4.Config(data=str(tiny_dataset), hidden=8, views="id", id_dropout=0.5),
                               ds.n_items, ["id"], None, None, np.ones(ds.n_items)).train()
    assert torch.equal(plain.items(ids), plain.items.emb(ids).view(len(ids), 1, 8))  # nothing to fall back on: off


def test_pca_start_is_content_shaped_at_the_random_inits_scale(tiny_dataset):
    payload = write_semantics(tiny_dataset)
    ds = common.load_dataset(tiny_dataset)
    cfg = stage4.Config(data=str(tiny_dataset), hidden=4, semantic="raw", id_init="pca", whiten=True)
    model = stage4.Recommender(cfg, ds.n_items, ["A", "B"], None, payload, np.ones(ds.n_items))
    emb = model.items.emb.weight[1:ds.n_items + 1].detach()
    table_b = stage4.semantic_tables(cfg, ["B"], None, payload)["B"]
    expect = stage4.pca(table_b, 4)
    got = emb[:, 4:]
    assert torch.allclose(got / got.std(), expect / expect.std(), atol=1e-5)
    assert got.std().item() == pytest.approx(cfg.init_scale / 2, rel=1e-4)


def test_levers_read_training_interactions_only(tiny_dataset, tmp_path):
    """Gate, PCA, whitening, the logit adjustment, the content residual and the ID alignment read content and training
    interactions: replacing every user's validation AND test target leaves the whole training (loss curve) unchanged;
    validation (which reads its targets) may change."""
    from conftest import write_dataset
    seqs = _read_seqs(tiny_dataset)
    items = [json.loads(line) for line in open(tiny_dataset / "items.jsonl")]
    rng = np.random.default_rng(7)
    other = write_dataset(tmp_path / "other", {u: s[:-2] + [f"i{rng.integers(40)}", f"i{rng.integers(40)}"]
                                               for u, s in seqs.items()}, items)
    runs = []
    for root in (tiny_dataset, other):
        write_semantics(root)
        cfg = stage4.Config(data=str(root), views="dual", semantic="raw", whiten=True, id_init="pca", id_gate=2.0,
                            id_free="B", pop_adjust=1.0, content_residual=True, id_align=0.5, hidden=8, epochs=3,
                            batch_size=16, seed=3, threads=1, content_grid="0,1")
        runs.append(stage4.train(cfg))
    a, b = runs
    assert [r["loss"] for r in a["curve"]] == [r["loss"] for r in b["curve"]]
    assert a["test"]["full"] != b["test"]["full"]


def test_content_match_picks_gamma_on_validation_and_matches_hand_computed_ranks(tiny_dataset):
    payload = write_semantics(tiny_dataset)
    cfg = stage4.Config(data=str(tiny_dataset), views="id", hidden=8, epochs=3, batch_size=16, threads=1,
                        content_grid="0,0.5,1000", name="cm")
    res = stage4.train(cfg)
    cm = res["content_match"]
    assert cm["valid_by_gamma"][0.0] == res["valid"]["full"]["NDCG@10"]  # gamma 0 = the model as trained
    assert cm["gamma"] == max(cm["grid"], key=lambda g: (cm["valid_by_gamma"][g], -g))
    # the content-only reference by hand: cosine to the last history item, the user's own items never ranked
    ds = common.load_dataset(tiny_dataset)
    _, users = ds.split()
    t = torch.nn.functional.normalize(payload["text_pooled"].float(), dim=-1).numpy()
    ranks = []
    for u in users:
        hist, target = ds.seqs[u][:-1], ds.seqs[u][-1]
        s = t @ t[hist[-1] - 1]
        s[hist - 1] = -np.inf
        ranks.append(1 + int((s >= s[target - 1]).sum()) - 1)  # ties count against the target
    hand = stage4.rank_metrics(ranks)
    for k, v in hand.items():
        assert cm["content_only"]["full"][k] == pytest.approx(v, abs=1e-6)
    # test_ranks.csv: one row per test user, in the split's order, whose ranks give back every figure of results.json
    with open(tiny_dataset / "runs" / "cm" / "test_ranks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["user_id"] for r in rows] == [ds.user_ids[u] for u in users]
    assert [r["item_id"] for r in rows] == [ds.item_ids[ds.seqs[u][-1] - 1] for u in users]
    assert [int(r["content_full"]) for r in rows] == ranks
    tail = np.array([r["head_item"] == "0" for r in rows])
    assert tail.sum() == res["test"]["groups"]["tail_items"]["users"]
    for col, want in (("full", res["test"]), ("sampled100", res["test"]), ("cm_full", cm["test"])):
        r = np.array([int(x[col]) for x in rows])
        proto = "sampled100" if col == "sampled100" else "full"
        assert stage4.user_ndcg(r, 10).mean() == pytest.approx(want[proto]["NDCG@10"], abs=1e-9)
        assert stage4.user_ndcg(r[tail], 10).mean() == pytest.approx(
            want["groups"]["tail_items"][proto]["NDCG@10"], abs=1e-9)


def test_semantic_sources_fused_raw_and_both():
    """raw: A = mean of the item's available MLLM view vectors, B = its pooled original text; both = [fused, raw]."""
    g = torch.Generator().manual_seed(0)
    N, E = 7, 5
    view_emb, mask = torch.randn(N, 3, E, generator=g), torch.rand(N, 3, generator=g) < 0.6
    mask[0] = False  # an item without any MLLM view: zeros, not NaN
    sem = {"view_emb": view_emb, "view_mask": mask, "text_pooled": torch.randn(N, E, generator=g)}
    fused = {"h_A": torch.randn(N, 4, generator=g), "h_B": torch.randn(N, 4, generator=g)}
    tables = {src: stage4.semantic_tables(stage4.Config(semantic=src, whiten=False), ["A", "B"], fused, sem)
              for src in ("fused", "raw", "both")}
    m = mask.float()[..., None]
    raw_a = (view_emb * m).sum(1) / m.sum(1).clamp_min(1)
    unit = lambda x: x / x.norm(dim=-1).mean()  # noqa: E731  every table at unit mean norm
    assert torch.allclose(tables["raw"]["A"], unit(raw_a)) and tables["raw"]["A"][0].abs().max() == 0
    assert torch.allclose(tables["raw"]["B"], unit(sem["text_pooled"]))
    assert torch.allclose(tables["fused"]["B"], unit(fused["h_B"]))
    assert torch.allclose(tables["both"]["B"], unit(torch.cat([fused["h_B"], sem["text_pooled"]], 1)))


@pytest.mark.parametrize("train_items,loss", [("seen", "ce"), ("all", "ce"), ("seen", "bce")])
def test_train_items_seen_leaves_never_trained_items_out_of_the_loss(tiny_dataset, train_items, loss):
    """An item whose only interactions are validation / test targets is never a positive in training; with
    --train-items seen it is never a negative either, so its ID row keeps its initial value (Adam moves any row that
    gets a gradient)."""
    ds = common.load_dataset(tiny_dataset)
    train_seqs, _ = ds.split()
    pop = np.bincount(np.concatenate(train_seqs), minlength=ds.n_items + 1)[1:]
    if not (pop == 0).any():  # make one: the last item of one user becomes an item no one else has
        from conftest import write_dataset
        seqs = _read_seqs(tiny_dataset)
        u = next(iter(seqs))
        seqs[u] = seqs[u][:-1] + ["fresh"]
        items = [json.loads(line) for line in open(tiny_dataset / "items.jsonl")] + [{"item_id": "fresh",
                                                                                       "title": "new arrival"}]
        write_dataset(tiny_dataset, seqs, items)
        ds = common.load_dataset(tiny_dataset)
        pop = np.bincount(np.concatenate(ds.split()[0]), minlength=ds.n_items + 1)[1:]
    cold = int(np.flatnonzero(pop == 0)[0]) + 1
    cfg = stage4.Config(data=str(tiny_dataset), views="id", loss=loss, hidden=8, epochs=2, batch_size=16, threads=1,
                        train_items=train_items, patience=5, name=f"ti_{train_items}_{loss}")
    stage4.train(cfg)
    common.seed_everything(cfg.seed)
    start = stage4.Recommender(cfg, ds.n_items, ["id"], None).items.emb.weight[cold]
    trained = common.load_artifact(tiny_dataset / "runs" / cfg.name / "model.pt", "backbone")["state_dict"]
    assert torch.equal(trained["items.emb.weight"][cold], start) == (train_items == "seen")


def test_residual_text_tfidf_ranks_neighbours_by_shared_words(tiny_dataset):
    """--residual-text tfidf: the residual's neighbours and cosines are those of sublinear-tf TF-IDF text vectors,
    written out by hand here (idf = ln((1 + n) / (1 + df)) + 1, tf -> 1 + ln tf, rows at unit norm); the model built
    with the flag, and the one load_trained rebuilds from the saved run, carry exactly them; --match-text tfidf ranks
    the content-only reference by the same cosine to the last history item."""
    texts = ["red lipstick red", "red lipstick matte", "blue shampoo", "shampoo for dry hair", ""]
    ids, cos = stage4.tfidf_nearest(texts, 2)
    docs = [t.split() for t in texts]
    vocab = sorted({w for d in docs for w in d})
    n = len(docs)
    idf = {w: math.log((1 + n) / (1 + sum(w in d for d in docs))) + 1 for w in vocab}
    x = torch.tensor([[(1 + math.log(d.count(w))) * idf[w] if w in d else 0.0 for w in vocab] for d in docs])
    x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    c = x @ x.T
    c.fill_diagonal_(float("-inf"))
    torch.testing.assert_close(cos, c.topk(2, dim=1).values)
    assert ids[0, 0] == 2 and ids[2, 0] == 4  # lipstick -> lipstick, shampoo -> shampoo (1-based ids)
    assert cos[4].eq(0).all()  # an item without text shares no word with any other
    payload = write_semantics(tiny_dataset)
    ds = common.load_dataset(tiny_dataset, check_images=False)
    cfg = stage4.Config(data=str(tiny_dataset), views="dual", semantic="raw", hidden=8, residual_k=5,
                        residual_text="tfidf", match_text="tfidf", epochs=1, batch_size=16, threads=1,
                        content_grid="0,1", name="tf")
    want_ids, want_cos = stage4.tfidf_nearest(ds.texts(), 5)
    res = stage4.train(cfg)
    assert res["content_match"]["text"].startswith("TF-IDF")
    t = stage4.tfidf(ds.texts()).toarray()
    ranks = []
    for u in ds.split()[1]:
        hist, target = ds.seqs[u][:-1], ds.seqs[u][-1]
        sc = t @ t[hist[-1] - 1]
        sc[hist - 1] = -np.inf
        ranks.append(int((sc >= sc[target - 1]).sum()))  # ties count against the target
    for k, v in stage4.rank_metrics(ranks).items():
        assert res["content_match"]["content_only"]["full"][k] == pytest.approx(v, abs=1e-6)
    model, _, _ = stage4.load_trained(tiny_dataset, "tf", "cpu")
    assert torch.equal(model.items.near_ids[1:ds.n_items + 1], want_ids)
    torch.testing.assert_close(model.items.near_cos[1:ds.n_items + 1], want_cos)
    encoder = stage4.Recommender(stage4.Config(data=str(tiny_dataset), semantic="raw", hidden=8, residual_k=5),
                                 ds.n_items, ["A", "B"], None, payload, None, ds.texts())
    assert not torch.equal(encoder.items.near_ids[1:ds.n_items + 1], want_ids)  # the default reads the encoder view
    for bad in ({"residual_text": "bm25"}, {"match_text": "bm25"}):
        with pytest.raises(SystemExit, match="residual-text"):
            stage4.resolve_views(stage4.Config(data=str(tiny_dataset), views="dual", **bad))


def test_match_tail_and_match_query_weigh_the_cosine_up_on_tail_candidates_and_tail_queries(tiny_dataset):
    """--match-tail / --match-query: (gamma, beta, delta) is chosen on validation over the whole grid; score + (gamma +
    beta tail_j + delta q_u) cos equals the plain match at gamma + beta + delta when every item is tail, and at gamma
    when none is; with a mask that marks only the users' last items, the query weight acts and the tail one does not."""
    write_semantics(tiny_dataset)
    cfg = stage4.Config(data=str(tiny_dataset), views="id", hidden=8, epochs=2, batch_size=16, threads=1,
                        content_grid="0,0.5", match_tail="2,1000", match_query="3", name="mt")
    cm = stage4.train(cfg)["content_match"]
    assert cm["tail_grid"] == [0.0, 2.0, 1000.0] and cm["query_grid"] == [0.0, 3.0]
    by = {(g, b, q): v for g, b, q, v in cm["valid_by_combo"]}
    assert len(by) == 2 * 3 * 2
    assert (cm["gamma"], cm["tail_weight"], cm["query_weight"]) == max(by, key=lambda k: (by[k], -k[0], -k[1], -k[2]))
    assert cm["valid"]["full"]["NDCG@10"] == by[cm["gamma"], cm["tail_weight"], cm["query_weight"]]
    assert cm["valid_by_gamma"] == {g: by[g, 0.0, 0.0] for g in (0.0, 0.5)}
    model, cfg, ds = stage4.load_trained(tiny_dataset, "mt", "cpu")
    d = stage4.build_data(cfg, ds)
    seen, _ = stage4.right_aligned([ds.seqs[u][:-1] for u in d.eval_users], 50)
    text = torch.nn.functional.normalize(common.load_artifact(tiny_dataset / "semantics.pt", "semantics")
                                         ["text_pooled"].float(), dim=-1)
    cosine = lambda ids: text[torch.from_numpy(ids)] @ text.T
    run = lambda combos, tail: stage4.content_match_ranks(model, d.test[0], seen, d.test[1], d.test[2], cosine,
                                                          combos, tail, cfg, torch.device("cpu"), False)
    same = lambda r, k1, k2: all(np.array_equal(x, y) for x, y in zip(r[k1], r[k2]))
    ones, zeros = torch.ones(ds.n_items), torch.zeros(ds.n_items)
    a, b = run([(0.5, 2.0, 3.0), (5.5, 0.0, 0.0)], ones), run([(0.5, 2.0, 3.0), (0.5, 0.0, 0.0)], zeros)
    assert same(a, (0.5, 2.0, 3.0), (5.5, 0.0, 0.0)) and same(b, (0.5, 2.0, 3.0), (0.5, 0.0, 0.0))
    assert not all(np.array_equal(x, y) for x, y in zip(a[0.5, 2.0, 3.0], b[0.5, 2.0, 3.0]))  # the mask does count
    lasts = torch.zeros(ds.n_items)
    lasts[torch.from_numpy(d.test[0][:, -1] - 1)] = 1.0  # every user's query is tail, most candidates are not
    c = run([(0.0, 0.0, 3.0), (3.0, 0.0, 0.0), (0.0, 3.0, 0.0), (0.0, 0.0, 0.0)], lasts)
    assert same(c, (0.0, 0.0, 3.0), (3.0, 0.0, 0.0))  # q_u = 1 for every user: delta acts like gamma
    assert not same(c, (0.0, 3.0, 0.0), (3.0, 0.0, 0.0))  # only the (zeroed, own) last items are tail candidates
    for flag in ("match_tail", "match_query"):
        with pytest.raises(SystemExit, match=flag.replace("_", "-")):
            stage4.resolve_views(stage4.Config(data=str(tiny_dataset), views="id", **{flag: "high"}))
