"""Stage 3 of DMESR: bidirectional cross-attention fusion of coarse MLLM semantics with fine-grained text.

The coarse semantics of item i are its aligned MLLM views (stage 2, up to three vectors); the fine-grained semantics
are the token-level encoder states of its original text t_i (stage 1). Per item, never across the positions of a
user's sequence (so nothing can leak from the future), two cross-attentions read one from the other:
  coarse <- fine : queries = the aligned views,  keys/values = the projected text tokens   -> pooled into h_A
  fine <- coarse : queries = the text tokens,    keys/values = the aligned views           -> pooled into h_B
(multi-head, scaled_dot_product_attention with key-padding masks, residual + LayerNorm, feed-forward, masked mean).
h_A and h_B are the "dual view" that stage 4 plugs into a sequential recommender.

The module is pre-trained self-supervised on TRAINING interactions only (common.Dataset.split() train part): a
next-item InfoNCE between consecutive training items in each view, plus an InfoNCE agreement between h_A and h_B of
the same item. Validation and test targets are never read.

    python 03_fuse.py DATA [--d 64 --heads 4 --epochs 20] [--no-align] [--no-cross] [--out fused.pt]

Reads DATA/semantics.pt and DATA/aligned.pt (not with --no-align: the raw view embeddings then go through a fresh
linear projection). Writes DATA/fused.pt (or --out, a file name inside DATA or a path): h_A, h_B [N, d], the module's
kwargs and state, the inputs it maps (so stage 4's --finetune-fusion can train it end to end), variant and config.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import log


@dataclass
class Config:
    data: str
    """dataset directory (reads semantics.pt and aligned.pt there)"""
    semantics: str = ""
    """stage-1 artifact (default: DATA/semantics.pt)"""
    aligned: str = ""
    """stage-2 artifact (default: DATA/aligned.pt)"""
    out: str = "fused.pt"
    """output file; a bare file name is written inside DATA (ablations: fused_noalign.pt, fused_nocross.pt)"""
    align: bool = True
    """use the aligned views of stage 2 as coarse semantics (--no-align: raw view embeddings + a fresh projection)"""
    cross: bool = True
    """bidirectional cross-attention (--no-cross: h_A = masked mean of the views, h_B = masked mean of the tokens)"""
    d: int = 64
    """width of the fused representations h_A, h_B"""
    heads: int = 4
    """attention heads"""
    dropout: float = 0.1
    """dropout inside the fusion blocks during pretraining"""
    epochs: int = 20
    """pretraining passes over the consecutive training pairs"""
    batch: int = 512
    """consecutive (item, next item) pairs per batch; the batch's other next items are the negatives"""
    lr: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    tau: float = 0.1
    """InfoNCE temperature of the pretraining losses"""
    agree_weight: float = 0.5
    """weight of the h_A <-> h_B agreement InfoNCE against the next-item InfoNCE"""
    max_pairs: int = 0
    """cap on the consecutive training pairs used per epoch (0 = all)"""
    seed: int = 42
    """random seed (init, batch order, dropout)"""
    device: str = "auto"
    """cpu, cuda, cuda:1 or auto"""
    threads: int = 0
    """torch CPU threads (0 = torch's default; 1 is much faster when other jobs share the cores)"""


# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: bidirectional cross-attention fusion (the module stage 4 can fine-tune)
# ----------------------------------------------------------------------------------------------------------------------

class CrossBlock(nn.Module):
    """Queries attend to another sequence (+ a learned null key), then residual + LayerNorm and a feed-forward."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        assert d % heads == 0, f"d={d} must be divisible by heads={heads}"
        self.h, self.dropout = heads, dropout
        self.q, self.kv, self.o = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        # the null key/value lets an item with no keys (no text, no MLLM view) attend to "nothing" instead of NaN
        self.null = nn.Parameter(torch.zeros(1, 1, d))
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.drop = nn.Dropout(dropout)
        self.sdpa = True

    def forward(self, x, ctx, ctx_mask):
        b, lq, d = x.shape
        ctx = torch.cat([self.null.expand(b, 1, d), ctx], 1)
        ctx_mask = torch.cat([ctx_mask.new_ones(b, 1), ctx_mask], 1)
        split = lambda t: t.view(b, -1, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        k, v = self.kv(ctx).chunk(2, -1)
        y = common.attend(split(self.q(x)), split(k), split(v), ctx_mask[:, None, None, :],
                          self.dropout if self.training else 0.0, "sdpa" if self.sdpa else "plain")
        x = self.ln1(x + self.drop(self.o(y.transpose(1, 2).reshape(b, lq, d))))
        return self.ln2(x + self.drop(self.ff(x)))


def masked_mean(x, mask):
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class BiCrossFusion(nn.Module):
    """coarse [B, V, Dc] (+ mask [B, V]) and fine [B, T, Df] (+ mask [B, T]) of B items -> (h_A, h_B), each [B, d].

    Items are independent rows: item i's outputs depend on item i's inputs only.
    """

    def __init__(self, d_coarse: int, d_fine: int, d: int = 64, heads: int = 4, n_views: int = 3,
                 dropout: float = 0.1, cross: bool = True):
        super().__init__()
        self.cross = cross
        self.coarse_proj, self.fine_proj = nn.Linear(d_coarse, d), nn.Linear(d_fine, d)
        self.view_type = nn.Parameter(torch.randn(n_views, d) * 0.02)  # which MLLM prompt a coarse vector came from
        if cross:
            self.coarse_from_fine = CrossBlock(d, heads, dropout)  # -> h_A
            self.fine_from_coarse = CrossBlock(d, heads, dropout)  # -> h_B
        self.norm_a, self.norm_b = nn.LayerNorm(d), nn.LayerNorm(d)
        # the representation of an item with no valid query (no MLLM view for h_A, no text token for h_B)
        self.empty = nn.Parameter(torch.zeros(2, d))

    def forward(self, coarse, coarse_mask, fine, fine_mask, groups: int = 4):
        """Items are fused in `groups` groups of similar text length, each without the token columns that are padding
        in all of its items (masked keys, unpooled queries: they change nothing). The text tokens dominate the cost
        and a batch's lengths vary a lot (Beauty titles: 18 of 32 tokens on average), so this skips most padding;
        rows are independent, so the outputs are the same as one pass over the whole batch."""
        fine_mask = fine_mask.bool()
        n = len(fine_mask)
        if groups <= 1 or n < 64 * groups:
            return self._fuse(coarse, coarse_mask, fine, fine_mask)
        ends = (fine_mask * torch.arange(1, fine_mask.shape[1] + 1, device=fine_mask.device)).amax(1)  # last token + 1
        order = ends.argsort(stable=True)
        outs = []
        for idx in order.chunk(groups):
            cols = max(int(ends[idx].max()), 1)
            outs.append(self._fuse(coarse[idx], coarse_mask[idx], fine[idx, :cols], fine_mask[idx, :cols]))
        inv = torch.empty_like(order)
        inv[order] = torch.arange(n, device=order.device)
        return torch.cat([o[0] for o in outs])[inv], torch.cat([o[1] for o in outs])[inv]

    def _fuse(self, coarse, coarse_mask, fine, fine_mask):
        dtype = self.coarse_proj.weight.dtype
        coarse_mask, fine_mask = coarse_mask.bool(), fine_mask.bool()
        # token columns padded in every item change nothing: drop them (titles are much shorter than 32 tokens)
        cols = fine_mask.any(0).nonzero()[:, 0]
        if len(cols) < fine_mask.shape[1]:
            cols = cols if len(cols) else cols.new_zeros(1)
            fine, fine_mask = fine[:, cols], fine_mask[:, cols]
        c = self.coarse_proj(coarse.to(dtype)) + self.view_type
        f = self.fine_proj(fine.to(dtype))
        if self.cross:
            a = self.coarse_from_fine(c, f, fine_mask)   # coarse <- fine
            b = self.fine_from_coarse(f, c, coarse_mask)  # fine <- coarse
        else:
            a, b = c, f
        h_a = self.norm_a(masked_mean(a, coarse_mask))
        h_b = self.norm_b(masked_mean(b, fine_mask))
        h_a = torch.where(coarse_mask.any(1, keepdim=True), h_a, self.empty[0])
        h_b = torch.where(fine_mask.any(1, keepdim=True), h_b, self.empty[1])
        return h_a, h_b


# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: self-supervised pretraining on training interactions only
# ----------------------------------------------------------------------------------------------------------------------

def training_pairs(train_seqs, max_pairs: int = 0, seed: int = 0) -> np.ndarray:
    """(item, next item) for every consecutive pair of every user's TRAINING sequence; rows of 0-based item indices."""
    pairs = [np.stack([s[:-1], s[1:]], 1) for s in train_seqs if len(s) >= 2]
    pairs = np.concatenate(pairs) - 1 if pairs else np.zeros((0, 2), dtype=np.int64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]  # a repeated item is not a transition
    if max_pairs and len(pairs) > max_pairs:
        pairs = pairs[np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)]
    return pairs


class Pretrainer(nn.Module):
    """The fusion module plus the small heads of its pretraining losses (discarded afterwards)."""

    def __init__(self, fusion: BiCrossFusion, d: int):
        super().__init__()
        self.fusion = fusion
        # next-item predictors: map an item's view to a guess of the next item's view (a transition, not identity)
        self.next_a, self.next_b = nn.Linear(d, d), nn.Linear(d, d)

    def loss(self, inputs, src, dst, cfg: Config):
        items, inv = torch.unique(torch.cat([src, dst]), return_inverse=True)
        h_a, h_b = self.fusion(*(t[items] for t in inputs))
        s, t = inv[:len(src)], inv[len(src):]
        l_next = (common.info_nce(self.next_a(h_a[s]), h_a[t], cfg.tau, dst)
                  + common.info_nce(self.next_b(h_b[s]), h_b[t], cfg.tau, dst))
        # agreement: the two views of one item identify it among the batch's items
        l_agree = 0.5 * (common.info_nce(h_a, h_b, cfg.tau) + common.info_nce(h_b, h_a, cfg.tau))
        return l_next + cfg.agree_weight * l_agree, l_next.detach(), l_agree.detach()


def pretrain(fusion: BiCrossFusion, inputs, pairs: np.ndarray, cfg: Config, device):
    model = Pretrainer(fusion, cfg.d).to(device)
    if len(pairs) < 2:
        log.warning(f"only {len(pairs)} consecutive training pair(s): the fusion module stays at its initialisation")
        return []
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    pairs_t = torch.from_numpy(pairs).to(device)
    curve = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = torch.randperm(len(pairs_t), generator=g).to(device)
        sums, steps, t0 = np.zeros(3), 0, time.time()
        bar = tqdm(range(0, len(order), cfg.batch), desc=f"epoch {epoch}", leave=False, mininterval=2, unit="batch")
        for s in bar:
            b = pairs_t[order[s:s + cfg.batch]]
            if len(b) < 2:
                continue
            loss, l_next, l_agree = model.loss(inputs, b[:, 0], b[:, 1], cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums += [loss.item(), l_next.item(), l_agree.item()]
            steps += 1
        sums /= max(steps, 1)
        curve.append({"epoch": epoch, "loss": sums[0], "next": sums[1], "agree": sums[2]})
        log.info(f"epoch {epoch:3d}  loss {sums[0]:.4f} (next-item {sums[1]:.4f}, agreement {sums[2]:.4f})  "
                 f"{len(order) / (time.time() - t0):,.0f} pairs/s")
    return curve


@torch.no_grad()
def encode_all(fusion: BiCrossFusion, inputs, device, chunk: int = 1024):
    fusion.eval()
    n = len(inputs[0])
    outs = [fusion(*(t[s:s + chunk].to(device) for t in inputs)) for s in range(0, n, chunk)]
    return torch.cat([o[0] for o in outs]).float().cpu(), torch.cat([o[1] for o in outs]).float().cpu()


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: load the stage-1/2 artifacts, pretrain, write fused.pt
# ----------------------------------------------------------------------------------------------------------------------

def main(cfg: Config):
    common.setup_logging()
    common.log_config(cfg)
    device = common.pick_device(cfg.device)
    common.seed_everything(cfg.seed, device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = Path(cfg.data)
    ds = common.load_dataset(data, check_images=False)
    sem_path = Path(cfg.semantics or data / "semantics.pt")
    sem = common.load_artifact(sem_path, "semantics", fingerprint=ds.fingerprint, item_ids=ds.item_ids)
    if cfg.align:
        al_path = Path(cfg.aligned or data / "aligned.pt")
        al = common.load_artifact(al_path, "aligned", fingerprint=ds.fingerprint, item_ids=ds.item_ids)
        coarse, coarse_mask = al["aligned"].float(), al["view_mask"].bool()
    else:  # ablation: no contrastive alignment, the raw encoder vectors of the descriptions (projected in the module)
        coarse, coarse_mask = sem["view_emb"].float(), sem["view_mask"].bool()
    fine, fine_mask = sem["text_tokens"], sem["text_mask"].bool()
    n_no_text = int((~fine_mask.any(1)).sum())
    log.info(f"{ds.n_items} items; coarse {tuple(coarse.shape)} ({'aligned' if cfg.align else 'raw, no alignment'}), "
             f"fine tokens {tuple(fine.shape)}; items without any MLLM view: {int((~coarse_mask.any(1)).sum())}, "
             f"without text tokens: {n_no_text}")

    train_seqs, _ = ds.split()  # the only interactions stage 3 reads
    pairs = training_pairs(train_seqs, cfg.max_pairs, cfg.seed)
    log.info(f"pretraining on {len(pairs):,} consecutive training pairs (validation/test items excluded)")

    module_config = dict(d_coarse=coarse.shape[-1], d_fine=fine.shape[-1], d=cfg.d, heads=cfg.heads,
                         n_views=coarse.shape[1], dropout=cfg.dropout, cross=cfg.cross)
    fusion = BiCrossFusion(**module_config)
    inputs = [coarse.to(device), coarse_mask.to(device), fine.to(device), fine_mask.to(device)]
    t0 = time.time()
    curve = pretrain(fusion, inputs, pairs, cfg, device)
    h_a, h_b = encode_all(fusion, inputs, device)
    log.info(f"pretraining took {time.time() - t0:.1f}s; h_A {tuple(h_a.shape)}, h_B {tuple(h_b.shape)}")

    out = Path(cfg.out)
    out = data / out if out.parent == Path(".") else out
    common.save_artifact(out, "fused", {
        "item_ids": list(sem["item_ids"]), "h_A": h_a, "h_B": h_b,
        "module_config": module_config, "module_state": {k: t.cpu() for k, t in fusion.state_dict().items()},
        "inputs": {"coarse": coarse, "coarse_mask": coarse_mask, "fine": fine, "fine_mask": fine_mask},
        "variant": {"align": cfg.align, "cross": cfg.cross}, "pretrain_curve": curve,
    }, cfg, ds.fingerprint)
    log.info(f"wrote {out}")


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__.split("\n\n")[0]))
