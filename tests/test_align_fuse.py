"""Stages 2 and 3: contrastive alignment and bidirectional cross-attention fusion.

semantics.pt is fabricated here (random tensors of the stage-1 contract's shapes, labelled as a fixture) so these tests
do not depend on stage 1 or on any model.
"""
import importlib
import json
import math
import statistics

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
from conftest import run_script, write_dataset

align_mod = importlib.import_module("02_align")
fuse_mod = importlib.import_module("03_fuse")


def fake_semantics(root, e=32, t=8, seed=0, drop_img_every=4):
    """A fixture semantics.pt for the dataset at `root`: the three views of item i are different random linear maps of
    one latent vector of i plus noise (so they are related but not aligned); every `drop_img_every`-th item has no
    image (img and mm absent); text lengths vary from 0 to t tokens (item 0 has no text)."""
    ds = common.load_dataset(root, check_images=False)
    g = torch.Generator().manual_seed(seed)
    n = ds.n_items
    z = torch.randn(n, 16, generator=g)
    maps = torch.randn(3, 16, e, generator=g)
    view_emb = F.normalize(torch.einsum("nk,vke->nve", z, maps) + 0.1 * torch.randn(n, 3, e, generator=g), dim=-1)
    view_mask = torch.ones(n, 3, dtype=torch.bool)
    view_mask[::drop_img_every, 0] = False
    view_mask[::drop_img_every, 2] = False
    view_emb = view_emb * view_mask.unsqueeze(-1)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    lengths[0] = 0
    text_mask = torch.arange(t)[None, :] < lengths[:, None]
    text_tokens = (torch.randn(n, t, e, generator=g) + z[:, None, :1]) * text_mask.unsqueeze(-1)
    payload = {
        "item_ids": ds.item_ids, "views": ["img", "txt", "mm"],
        "texts": {v: [None] * n for v in ["img", "txt", "mm"]},
        "view_emb": view_emb.half(), "view_mask": view_mask,
        "text_tokens": text_tokens.half(), "text_mask": text_mask,
        "text_pooled": F.normalize(text_tokens.sum(1), dim=-1).half(),
    }
    common.save_artifact(root / "semantics.pt", "semantics", payload, {"backend": "test fixture (random tensors)"},
                         ds.fingerprint)
    return payload


# ---------------------------------------------------------------------------------------------------------------------
# Stage 2: alignment
# ---------------------------------------------------------------------------------------------------------------------

def test_alignment_loss_decreases_and_same_item_views_end_up_nearest(tiny_dataset):
    sem = fake_semantics(tiny_dataset)
    x, m = sem["view_emb"].float(), sem["view_mask"]
    cfg = align_mod.Config(data=str(tiny_dataset), d=16, epochs=60, batch=32, lr=1e-2, tau=0.1, log_every=1000)
    before = align_mod.cross_view_retrieval(x, m)
    heads, aligned, curve = align_mod.align(x, m, cfg, torch.device("cpu"))
    losses = [l for _, l in curve]
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    after = align_mod.cross_view_retrieval(aligned, m)
    # each item's txt view is nearer to its own img/mm view than to any other item's (top-1 among all 40 items)
    for pair in ["img-txt", "img-mm", "txt-mm"]:
        assert after[pair] >= 0.9 and after[pair] > before[pair] + 0.3, (pair, before, after)
    # absent views stay exactly zero, present ones are unit vectors
    assert torch.all(aligned[~m] == 0)
    assert torch.allclose(aligned[m].norm(dim=-1), torch.ones(int(m.sum())), atol=1e-5)


def test_alignment_with_a_single_view_says_so_and_still_writes(tiny_dataset):
    sem = fake_semantics(tiny_dataset)
    ds = common.load_dataset(tiny_dataset, check_images=False)
    sem["view_mask"][:, [0, 2]] = False  # text-only catalogue (Beauty): no pair of views exists
    sem["view_emb"] = sem["view_emb"] * sem["view_mask"].unsqueeze(-1)
    common.save_artifact(tiny_dataset / "semantics.pt", "semantics", sem, {}, ds.fingerprint)
    p = run_script("02_align.py", tiny_dataset, "--d", "16", "--epochs", "3")
    assert "no contrastive pair loss is possible" in p.stdout
    al = common.load_artifact(tiny_dataset / "aligned.pt", "aligned", fingerprint=ds.fingerprint)
    assert al["pair_loss"] is False and al["aligned"][:, 1].norm(dim=-1).min() > 0.99
    assert torch.all(al["aligned"][:, [0, 2]] == 0)


# ---------------------------------------------------------------------------------------------------------------------
# Stage 3: the fusion module
# ---------------------------------------------------------------------------------------------------------------------

def _random_batch(b=6, v=3, t=7, dc=16, df=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse, fine = torch.randn(b, v, dc, generator=g), torch.randn(b, t, df, generator=g)
    cm = torch.rand(b, v, generator=g) > 0.3
    fm = torch.arange(t)[None] < torch.randint(0, t + 1, (b, 1), generator=g)
    return coarse, cm, fine, fm


@pytest.mark.parametrize("cross", [True, False])
def test_fusion_output_of_item_i_ignores_other_items(cross):
    torch.manual_seed(0)
    fusion = fuse_mod.BiCrossFusion(d_coarse=16, d_fine=24, d=32, heads=4, cross=cross).eval()
    coarse, cm, fine, fm = _random_batch()
    fm[0] = True
    a0, b0 = fusion(coarse, cm, fine, fm)
    fine2, coarse2 = fine.clone(), coarse.clone()
    fine2[1:] = torch.randn_like(fine2[1:])  # every other item's text tokens and views change
    coarse2[1:] = torch.randn_like(coarse2[1:])
    fm2 = fm.clone()
    fm2[1:] = ~fm2[1:]
    a1, b1 = fusion(coarse2, cm, fine2, fm2)
    assert torch.equal(a0[0], a1[0]) and torch.equal(b0[0], b1[0])
    assert not torch.allclose(a0[1:], a1[1:])  # the change is visible where it should be


def test_fusion_fully_masked_items_are_finite_and_padding_is_ignored():
    torch.manual_seed(0)
    fusion = fuse_mod.BiCrossFusion(d_coarse=16, d_fine=24, d=32, heads=4).eval()
    coarse, cm, fine, fm = _random_batch()
    cm[0], fm[1], cm[2], fm[2] = False, False, False, False  # no view / no text / neither
    h_a, h_b = fusion(coarse, cm, fine, fm)
    assert torch.isfinite(h_a).all() and torch.isfinite(h_b).all()
    # values behind the masks never matter, even if they are NaN
    coarse2, fine2 = coarse.clone(), fine.clone()
    coarse2[~cm], fine2[~fm] = float("nan"), float("nan")
    h_a2, h_b2 = fusion(coarse2.nan_to_num(1e3), cm, fine2.nan_to_num(-1e3), fm)
    assert torch.allclose(h_a, h_a2, atol=1e-5) and torch.allclose(h_b, h_b2, atol=1e-5)
    # gradients flow and stay finite through fully masked rows
    fusion.train()
    sum(t.sum() for t in fusion(coarse, cm, fine, fm)).backward()
    assert all(torch.isfinite(p.grad).all() for p in fusion.parameters() if p.grad is not None)


def test_sdpa_path_equals_plain_attention():
    torch.manual_seed(0)
    fusion = fuse_mod.BiCrossFusion(d_coarse=16, d_fine=24, d=32, heads=4).eval()
    batch = _random_batch(b=9)
    fast = fusion(*batch)
    for blk in (fusion.coarse_from_fine, fusion.fine_from_coarse):
        blk.sdpa = False
    plain = fusion(*batch)
    for x, y in zip(fast, plain):
        assert torch.allclose(x, y, atol=1e-5)


def test_length_groups_compute_the_same_pretraining_loss_and_gradients(monkeypatch):
    """One pretraining step on fixed inputs: fusing items in groups of similar text length (the default) against one
    pass over the whole batch (the computation before grouping), dropout off so both draw nothing at random."""
    import functools
    torch.manual_seed(0)
    n, t = 600, 32
    # every item has text and a view: an item without either maps to the zero-initialised `empty` vector, whose
    # normalised gradient is ~1e10 at the first step and would swamp an absolute tolerance
    lengths = torch.randint(1, t + 1, (n,))
    lengths[:5] = t  # a few long titles: without groups every item pays for 32 columns
    fm = torch.arange(t)[None] < lengths[:, None]
    fine = torch.randn(n, t, 48).half() * fm[..., None]
    cm = torch.rand(n, 3) < 0.7
    cm[:, 1] = True
    coarse = torch.randn(n, 3, 16) * cm[..., None]
    src, dst = torch.randint(0, n, (2, 256))
    cfg = fuse_mod.Config(data="", d=32, heads=4, dropout=0.0)

    def step(groups):
        torch.manual_seed(1)
        model = fuse_mod.Pretrainer(fuse_mod.BiCrossFusion(16, 48, d=32, heads=4, dropout=0.0), 32).train()
        monkeypatch.setattr(model.fusion, "forward", functools.partial(type(model.fusion).forward, model.fusion,
                                                                        groups=groups))
        loss, _, _ = model.loss([coarse, cm, fine, fm], src, dst, cfg)
        loss.backward()
        return loss, {k: p.grad for k, p in model.named_parameters()}

    loss1, grads1 = step(1)
    loss4, grads4 = step(4)
    assert torch.allclose(loss1, loss4, atol=1e-5, rtol=0), (loss1, loss4)
    assert grads1.keys() == grads4.keys()
    for k in grads1:
        assert torch.allclose(grads1[k], grads4[k], atol=1e-5, rtol=1e-5), k


def _pretrain_tables(root, seed=0):
    ds = common.load_dataset(root, check_images=False)
    sem = common.load_artifact(root / "semantics.pt", "semantics")
    cfg = fuse_mod.Config(data=str(root), d=16, heads=2, epochs=2, batch=64, seed=seed)
    torch.manual_seed(cfg.seed)
    fusion = fuse_mod.BiCrossFusion(d_coarse=32, d_fine=32, d=16, heads=2)
    inputs = [sem["view_emb"].float(), sem["view_mask"], sem["text_tokens"], sem["text_mask"]]
    train, _ = ds.split()
    fuse_mod.pretrain(fusion, inputs, fuse_mod.training_pairs(train), cfg, torch.device("cpu"))
    return fuse_mod.encode_all(fusion, inputs, torch.device("cpu"))


def test_pretraining_reads_no_validation_or_test_interaction(tmp_path, tiny_dataset):
    fake_semantics(tiny_dataset)
    base = _pretrain_tables(tiny_dataset)
    # same users and items, but the last two items (validation and test targets) of every user replaced
    rng = np.random.default_rng(1)
    seqs = {}
    with open(tiny_dataset / "interactions.csv") as f:
        next(f)
        for line in f:
            u, i, _ = line.strip().split(",")
            seqs.setdefault(u, []).append(i)
    items = [json.loads(l) for l in open(tiny_dataset / "items.jsonl")]
    for u, s in seqs.items():
        assert len(s) >= 3
        s[-2:] = [f"i{k}" for k in rng.integers(0, 40, 2)]
    other = write_dataset(tmp_path / "other", seqs, items)
    fake_semantics(other)
    assert common.load_dataset(other).fingerprint != common.load_dataset(tiny_dataset).fingerprint
    changed = _pretrain_tables(other)
    assert torch.equal(base[0], changed[0]) and torch.equal(base[1], changed[1])
    # ...while changing one training interaction does change them (the test can fail)
    seqs["u0"][0] = "i39" if seqs["u0"][0] != "i39" else "i38"
    third = write_dataset(tmp_path / "third", seqs, items)
    fake_semantics(third)
    assert not torch.equal(base[0], _pretrain_tables(third)[0])


# ---------------------------------------------------------------------------------------------------------------------
# End to end: 02 then 03 (all variants) as a user runs them
# ---------------------------------------------------------------------------------------------------------------------

def test_stage2_and_stage3_end_to_end(tiny_dataset):
    fake_semantics(tiny_dataset)
    ds = common.load_dataset(tiny_dataset, check_images=False)
    p = run_script("02_align.py", tiny_dataset, "--d", "16", "--epochs", "20", "--log-every", "5")
    assert "epoch   20  loss" in p.stdout and "cross-view top-1 retrieval" in p.stdout
    al = common.load_artifact(tiny_dataset / "aligned.pt", "aligned", fingerprint=ds.fingerprint)
    assert al["aligned"].shape == (40, 3, 16) and al["aligned"].dtype == torch.float32
    assert len(al["loss_curve"]) == 20 and al["config"]["d"] == 16

    run_script("03_fuse.py", tiny_dataset, "--d", "16", "--heads", "2", "--epochs", "2")
    run_script("03_fuse.py", tiny_dataset, "--d", "16", "--heads", "2", "--epochs", "1", "--no-align", "--no-cross",
               "--out", "fused_plain.pt")
    for name, variant, d_coarse in [("fused.pt", {"align": True, "cross": True}, 16),
                                    ("fused_plain.pt", {"align": False, "cross": False}, 32)]:
        fu = common.load_artifact(tiny_dataset / name, "fused", fingerprint=ds.fingerprint)
        assert fu["variant"] == variant and fu["item_ids"] == ds.item_ids
        assert fu["h_A"].shape == (40, 16) and fu["h_B"].shape == (40, 16)
        assert torch.isfinite(fu["h_A"]).all() and torch.isfinite(fu["h_B"]).all()
        assert fu["inputs"]["coarse"].shape == (40, 3, d_coarse) and fu["inputs"]["fine"].dtype == torch.float16
        # the contract stage 4 relies on: rebuilding the module from the artifact reproduces the tables for any rows
        fusion = importlib.import_module("03_fuse").BiCrossFusion(**fu["module_config"])
        fusion.load_state_dict(fu["module_state"])
        fusion.eval()
        rows = torch.tensor([5, 0, 17])
        i = fu["inputs"]
        h_a, h_b = fusion(i["coarse"][rows], i["coarse_mask"][rows], i["fine"][rows], i["fine_mask"][rows])
        assert torch.allclose(h_a, fu["h_A"][rows], atol=1e-5) and torch.allclose(h_b, fu["h_B"][rows], atol=1e-5)


def test_stage3_refuses_semantics_from_another_dataset(tmp_path, tiny_dataset):
    fake_semantics(tiny_dataset)
    other = write_dataset(tmp_path / "other", {"u": ["a", "b", "c"]}, [{"item_id": k, "title": k} for k in "abc"])
    (other / "semantics.pt").write_bytes((tiny_dataset / "semantics.pt").read_bytes())
    p = run_script("03_fuse.py", other, "--no-align", check=False)
    assert p.returncode != 0 and "made from another dataset" in p.stderr


def test_compare_table_reports_protocol_loss_seed_and_tail(tmp_path):
    def write(name, views, seed, ndcg, tail):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        m = {"NDCG@10": ndcg, "HR@10": 2 * ndcg, "MRR": ndcg / 2}
        (d / "results.json").write_text(json.dumps({
            "config": {"backbone": "sasrec", "loss": "ce", "views": views, "seed": seed, "fused": ""},
            "test": {"full": m, "sampled100": {k: 3 * v for k, v in m.items()},
                     "groups": {"tail_items": {"full": {"NDCG@10": tail}}, "head_items": {"full": {"NDCG@10": 0.9}}}}}))
    write("plain", "id", 42, 0.0123, 0.0011)
    write("dmesr", "dual", 43, 0.0456, 0.0022)
    out = run_script("bench/compare.py", tmp_path, "plain", "dmesr").stdout
    rows = [r for r in out.splitlines() if r.startswith("| plain") or r.startswith("| dmesr")]
    assert rows[0].split(" | ")[1:] == ["sasrec", "id", "full", "ce", "42", "0.0123", "0.0246", "0.0062", "0.0011 |"]
    assert rows[1].split(" | ")[5:7] == ["43", "0.0456"] and rows[1].endswith("0.0022 |")
    assert "0.1368" in run_script("bench/compare.py", tmp_path, "dmesr", "--protocol", "sampled100").stdout
    p = run_script("bench/compare.py", tmp_path, "missing", check=False)
    assert p.returncode != 0 and "runs/missing/results.json: not found" in p.stderr


def test_compare_paired_differences_match_a_hand_computation(tmp_path):
    def write(name, ranks, header="user_id,item_id,head_item,full,sampled100"):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        rows = [f"u{n},i{n},{int(n in (0, 3))},{r},{r}" for n, r in enumerate(ranks)]
        (d / "test_ranks.csv").write_text("\n".join([header, *rows]) + "\n")
    write("base", [1, 3, 20, 2])   # NDCG@10: 1, 1/log2(4) = 0.5, 0 (rank 20 > 10), 1/log2(3)
    write("new", [2, 1, 5, 2])     # 1/log2(3), 1, 1/log2(6), 1/log2(3)
    d = [1 / math.log2(3) - 1, 0.5, 1 / math.log2(6), 0.0]
    mean, half = statistics.fmean(d), 1.96 * statistics.stdev(d) / 2
    tail = d[1:3]  # users 1 and 2: targets outside the head
    tmean, thalf = statistics.fmean(tail), 1.96 * statistics.stdev(tail) / math.sqrt(2)
    out = run_script("bench/compare.py", tmp_path, "base", "new", "--paired").stdout
    row = next(r for r in out.splitlines() if r.startswith("| new"))
    assert row.split(" | ")[1:] == ["base", "4", f"{mean:+.4f} [{mean - half:+.4f}, {mean + half:+.4f}]", "2",
                                    f"{tmean:+.4f} [{tmean - thalf:+.4f}, {tmean + thalf:+.4f}]", "2 / 1 |"]
    write("other_split", [1, 1, 1])  # a user fewer: not the same test set
    p = run_script("bench/compare.py", tmp_path, "base", "other_split", "--paired", check=False)
    assert p.returncode != 0 and "different test users or targets" in p.stderr
    p = run_script("bench/compare.py", tmp_path, "base", "new:cm", "--paired", check=False)  # no content match there
    assert p.returncode != 0 and "runs/new/test_ranks.csv:1: no column 'cm_full'" in p.stderr
    write("broken", [1, "x", 1, 1])
    p = run_script("bench/compare.py", tmp_path, "base", "broken", "--paired", check=False)
    assert p.returncode != 0 and "runs/broken/test_ranks.csv:3: field 'full'" in p.stderr
