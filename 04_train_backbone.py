"""Stage 4 of DMESR: a sequential recommender (SASRec, GRU4Rec or BERT4Rec) with the dual-view plug-in.

The backbone reads a user's item sequence and scores every item by a dot product with the user's last state. What an
"item vector" is depends on --views, and that one seam (ItemEncoder) is where DMESR plugs in:
  id    the plain backbone: a learned ID embedding per item (the baseline);
  dual  DMESR: two views per item, A = adapter(h_A) and B = adapter(h_B) from stage 3's fused.pt (+ an ID embedding
        each, --no-id-emb drops it); one shared backbone encodes each view's sequence; the user vector is the concat of
        the two last states and the item vector the concat of the two view vectors; the score also adds w x
        cosine(candidate, last item read) over view B's frozen content at full width (--content-residual, w learned);
  A, B  one fused view only (ablations).
`--finetune-fusion` rebuilds stage 3's BiCrossFusion module and trains it end to end with the recommendation loss.

Training: `--loss ce` (softmax over all items at every position) or `--loss bce` (one uniform negative per position).
A user's own items are never candidates (--exclude-seen, default): each position's softmax leaves out the items it has
read, and the full ranking the user's history. Else the softmax must push the last item read below the next one at
every step, and with content in the item vectors that also pushes down every item that resembles it. Evaluation,
leave-one-out: full ranking over all items but the user's own (primary) and sampled-100 (100 negatives drawn once with
--eval-seed, uniformly, never an item of the user; for validation, none up to the validation target);
HR/NDCG@{5,10,20} and MRR with ties counted against the target; early stopping and model selection on validation
NDCG@10 only (full ranking for ce, sampled-100 for bce: --select); test evaluated once at the best epoch.

    python 04_train_backbone.py DATA [--backbone sasrec|gru4rec|bert4rec] [--loss ce|bce] [--views auto|id|dual|A|B]
    torchrun --nproc_per_node N 04_train_backbone.py DATA ...     (DDP: gloo on CPU, NCCL on GPU; rank 0 writes)
    python 04_train_backbone.py DATA --recommend RUN [--user ID ... | --history ID,ID,... | --users-file F] [--k 10]
                                                                  (top-k JSON lines from a trained run; recommend())

Reads DATA/interactions.csv, DATA/items.jsonl and, for the fused views, DATA/fused.pt (or --fused).
Writes DATA/runs/<name>/results.json (config, validation curve, best epoch, test metrics, groups, throughput),
DATA/runs/<name>/test_ranks.csv (each test user's target rank, for paired comparisons: bench/compare.py --paired) and
DATA/runs/<name>/model.pt (best-epoch weights; saved each time validation improves, so a crash loses nothing) and
DATA/runs/<name>/last.pt (the whole run state each epoch: `--resume` continues a killed run to the same results;
`--resume --epochs N` with a larger N extends a run that stopped at its epoch budget).
"""
from __future__ import annotations

import copy
import gc
import importlib
import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
from common import attend, log


# ----------------------------------------------------------------------------------------------------------------------
# Config: plain values with a one-line docstring each (the --help text); -1 = the backbone's own value
# ----------------------------------------------------------------------------------------------------------------------

# The per-backbone values behind -1, each chosen on Beauty validation NDCG@10 (figures in the README).
# Dropout: SASRec gains from more; GRU4Rec and BERT4Rec lose at 0.6.
DROPOUT = {"sasrec": 0.6, "gru4rec": 0.5, "bert4rec": 0.5}
# GRU4Rec takes larger steps: at 1e-3 it is still improving at the epoch cap; at 2e-3 it gets there in fewer epochs.
LR = {"sasrec": 1e-3, "gru4rec": 2e-3, "bert4rec": 1e-3}
# Item embeddings start at std init_scale / sqrt(hidden), positions at std init_scale (the transformers multiply items
# by sqrt(hidden), so both parts of the input start at init_scale). SASRec starts small because bce updates an item
# only when it is drawn, so a large random init stays in rarely drawn items' scores. GRU4Rec keeps 1: its inputs are
# not scaled up, so at 0.1 they would start near zero.
INIT_SCALE = {"sasrec": 0.1, "gru4rec": 1.0, "bert4rec": 1.0}


def per_backbone(table: dict) -> str:
    """'(sasrec 0.001, ...)': the values behind a -1 default, for --help."""
    return "(" + ", ".join(f"{b} {v:g}" for b, v in table.items()) + ")"


@dataclass
class Config:
    data: str = ""
    """dataset directory (interactions.csv + items.jsonl; fused.pt for the DMESR views)"""
    backbone: str = "sasrec"
    """sequential backbone: sasrec | gru4rec | bert4rec"""
    loss: str = "ce"
    """ce = softmax over all items at every position; bce = one uniformly sampled negative per position"""
    views: str = "auto"
    """item representation: id (plain backbone) | dual (DMESR h_A + h_B) | A | B (one view); auto = dual if fused.pt"""
    fused: str = ""
    """stage-3 artifact for the fused views (default DATA/fused.pt; ablation variants are other files)"""
    id_emb: bool = True
    """add a learned ID embedding to each fused view's adapter output"""
    finetune_fusion: bool = False
    """rebuild stage 3's BiCrossFusion from the fused file and train it end to end with the recommendation loss"""
    semantic: str = "fused"
    """content behind the views: fused (stage 3's h_A, h_B) | raw (stage 1: A = MLLM views, B = original text) | both"""
    semantics: str = ""
    """stage-1 artifact for --semantic raw and the content-match term (default DATA/semantics.pt)"""
    whiten: bool = False
    """centre and whiten each frozen semantic table (PCA over the catalogue's content) before its adapter"""
    id_init: str = "pca"
    """random | pca: each view's ID table starts from the centred PCA of that view's semantic table (LLM-ESR)"""
    id_gate: float = 0.0
    """scale item i's ID part by pop_i / (pop_i + k), pop = training interactions, k = this; 0 = off"""
    id_free: str = "B"
    """comma-separated views whose item vector is content only, no ID part (e.g. B)"""
    id_dropout: float = 0.0
    """in training, drop each item's ID part with this probability, drawn anew per item at each step, so the model
    also learns to score an item from its content alone, as it must a rare one (DropoutNet); 0 = off (no effect with
    --views id)"""
    content_residual: bool = True
    """score + w x cosine(candidate, the last item read) over the last content view's frozen vectors (centred, full
    width), w learned with the rest: the near-duplicates a d-wide adapter cannot resolve (no effect with --views id)"""
    residual_k: int = 100
    """--content-residual: each item's nearest neighbours by that cosine that carry it (0 elsewhere)"""
    residual_lags: int = 1
    """--content-residual: the last m items read each add w_j x cosine(candidate, item read j steps back), one w_j
    learned per lag (1 = the last item only)"""
    residual_text: str = "view"
    """--content-residual's cosine: view (the last content view's frozen vectors) | tfidf (TF-IDF of each item's text,
    word unigrams, sublinear tf, fitted on item content only: the exact words two titles share, which a sentence
    encoder blurs)"""
    residual_rare: bool = False
    """--content-residual: each term weighs w_j x (1 + u x rarity of the candidate), u learned from 0, rarity = 1 -
    log(1 + pop) / log(1 + max pop) by training interactions: the content match may count more where the ID is weak
    (no effect with --views id)"""
    residual_query: bool = False
    """--content-residual: the term of each item read weighs w_j x (1 + u x its rarity), u learned from 0 (rarity as
    --residual-rare): the content of a rare item read says more than its barely trained ID vector (no effect with
    --views id)"""
    pop_adjust: float = 0.0
    """logit adjustment: training scores get + this x log(1 + training popularity) of the item (none at evaluation),
    so the model's own scores hold less of the popularity prior and a rare item ranks by what it is like; 0 = off"""
    id_align: float = 0.0
    """item-level alignment (FAERec, LLMEmb): + this x a symmetric InfoNCE between each content view's adapter output
    and the ID vector of the same item, over the batch's distinct target items; 0 = off (no effect with --views id)"""
    id_align_tau: float = 0.05
    """--id-align: InfoNCE temperature"""
    train_items: str = "all"
    """items the loss ranks: all | seen (those with a training interaction; a new arrival is never a positive)"""
    exclude_seen: bool = True
    """the user's own items are never candidates: out of each position's training softmax (the items it has read) and
    out of the full-ranking evaluation (the whole history), as in --recommend; --no-exclude-seen ranks every item"""
    content_grid: str = "0,0.5,1,2,3,4,6,8,12,16,24,32"
    """inference-time content match: gammas tried on validation for score + gamma * cos(text, last text); empty = off"""
    match_text: str = "pooled"
    """the content match's text vectors: pooled (stage 1's encoder, semantics.pt text_pooled) | tfidf (as
    --residual-text tfidf)"""
    match_tail: str = "0"
    """content match, tail candidates: extra weights tried on validation with each gamma, score + (gamma + beta x
    tail_j) x cos, tail_j = 1 for the items outside the training-popularity head (--head-frac); 0 = off"""
    match_query: str = "0"
    """content match, tail queries: extra weights tried on validation with each (gamma, beta), + delta x q_u x cos,
    q_u = 1 when the user's last item is a tail item (its ID embedding is the weak one); 0 = off"""
    hidden: int = 64
    """hidden size of the backbone (per view; the dual-view user/item vectors are twice this)"""
    blocks: int = 2
    """transformer blocks (sasrec, bert4rec) or GRU layers (gru4rec)"""
    heads: int = 1
    """attention heads"""
    init_scale: float = -1.0
    """item embeddings start at std init_scale / sqrt(hidden), positions at init_scale; -1 = the backbone's own"""
    dropout: float = -1.0
    """dropout on embeddings, attention weights and feed-forward outputs; -1 = the backbone's own"""
    max_len: int = 50
    """longest history the backbone reads (most recent items kept)"""
    mask_prob: float = 0.2
    """bert4rec cloze: probability that a position is replaced by the mask token in training"""
    lr: float = -1.0
    """Adam learning rate; -1 = the backbone's own"""
    weight_decay: float = 0.0
    """Adam weight decay"""
    beta2: float = 0.999
    """Adam beta2 (torch's default; the SASRec reference code's 0.98 adapts faster to sparse embedding rows)"""
    batch_size: int = 128
    """user sequences per optimisation step (global batch: split across ranks under torchrun)"""
    epochs: int = 200
    """maximum number of epochs"""
    max_batches: int = 0
    """end each epoch after this many batches (0 = all); for benchmarks and smoke runs"""
    select: str = "auto"
    """protocol of the validation NDCG@10 that picks the epoch and stops early: full | sampled | auto (bce: sampled)"""
    patience: int = 30
    """stop after this many evaluations without a better validation NDCG@10 (long enough to cross early plateaus)"""
    eval_every: int = 1
    """epochs between validation evaluations"""
    eval_batch: int = 1024
    """users per evaluation batch"""
    eval_chunk: int = 0
    """score items in chunks of this many in full-ranking evaluation (0 = all at once); memory ~ eval_batch x chunk"""
    ce_chunk: int = 0
    """ce loss over item chunks of this many, recomputed in backward (0 = all at once); memory ~ positions x chunk"""
    eval_seed: int = 2024
    """seed of the sampled-100 negatives (fixed and independent of --seed, so every run ranks the same candidates)"""
    n_neg: int = 100
    """negatives per user in the sampled protocol"""
    head_frac: float = 0.2
    """group metrics: the most popular items (by training interactions) making up this fraction of items are 'head'"""
    short_len: int = 0
    """group metrics: users whose history has at most this many items are 'short' (0 = the median)"""
    attention: str = "sdpa"
    """attention path: sdpa (torch scaled_dot_product_attention) | plain (masked softmax; for tests and the bench)"""
    bucket: bool = True
    """group users of similar length into batches (then shuffle the batches) so trimmed batches carry little padding"""
    seed: int = 42
    """training seed (weights, batch order, dropout, negatives, cloze masks)"""
    amp: bool = False
    """train the backbone under bfloat16 autocast (for GPUs; loss and evaluation stay float32, so ties stay exact)"""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N (under torchrun each rank takes cuda:LOCAL_RANK)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    name: str = ""
    """run name: output goes to DATA/runs/<name>/ (default BACKBONE_LOSS_VIEWS_sSEED)"""
    recommend: str = ""
    """instead of training: top-k items from DATA/runs/<RUN>/model.pt as JSON lines (no users/histories given: all)"""
    user: list[str] = field(default_factory=list)
    """--recommend: user ids; the history is the user's whole sequence in interactions.csv"""
    history: list[str] = field(default_factory=list)
    """--recommend: histories as comma-separated item ids, oldest first (one argument per history)"""
    users_file: str = ""
    """--recommend: a text file of user ids, one per line"""
    k: int = 10
    """--recommend: items per user"""
    keep_seen: bool = False
    """--recommend: allow items already in the history (excluded by default)"""
    out: str = ""
    """--recommend: write the JSON lines to this file (default stdout)"""
    checkpoint_every: int = 1
    """epochs between writes of DATA/runs/<name>/last.pt (model, optimiser, generators, early stopping); 0 = never"""
    resume: bool = False
    """continue the run from DATA/runs/<name>/last.pt (refused if config or dataset differ, except a larger --epochs,
    which extends a run that hit its budget; no file: start afresh)"""

    def __post_init__(self):  # -1 resolved at once, so results.json records what the run used
        if self.backbone in DROPOUT:  # (an unknown backbone is refused with a clear message by resolve_views)
            self.dropout = DROPOUT[self.backbone] if self.dropout < 0 else self.dropout
            self.lr = LR[self.backbone] if self.lr < 0 else self.lr
            self.init_scale = INIT_SCALE[self.backbone] if self.init_scale < 0 else self.init_scale
        if self.select == "auto":
            self.select = "sampled" if self.loss == "bce" else "full"


HELP = {"dropout": per_backbone(DROPOUT), "lr": per_backbone(LR), "init_scale": per_backbone(INIT_SCALE)}

# --select picks the protocol whose validation NDCG@10 chooses the epoch. bce defaults to sampled-100, the protocol its
# paper family reports it on: its full-ranking validation NDCG@10 is a flat, noisy plateau, so patience on it would stop
# at a chance epoch.
SELECT = {"full": "full", "sampled": "sampled100"}


# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: item representation, the seam where DMESR plugs in (ID embeddings, or the dual view)
# ----------------------------------------------------------------------------------------------------------------------

def load_fusion_module(fused: dict) -> nn.Module:
    """Stage 3's BiCrossFusion rebuilt from fused.pt (module_config + module_state), for --finetune-fusion."""
    mod = importlib.import_module("03_fuse").BiCrossFusion(**fused["module_config"])
    mod.load_state_dict(fused["module_state"])
    return mod


def whiten(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Centre, rotate onto the principal axes and scale each axis to unit variance (PCA whitening, WhitenRec /
    AlphaFuse). Text embeddings are anisotropic (items' mean cosine is often > 0.8): a few shared directions dominate
    every dot product, and whitening lets the adapter see the directions that tell items apart. Axes with variance
    below eps x the largest are dropped (a rank-deficient table stays finite)."""
    x = x - x.mean(0)
    _, sv, vh = torch.linalg.svd(x, full_matrices=False)
    var = sv ** 2 / max(len(x) - 1, 1)
    keep = var > eps * var.max()
    return x @ vh[keep].T / var[keep].sqrt()


def pca(x: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] coordinates of the centred rows on their top-k principal axes (zero columns if rank < k)."""
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    out = x @ vh[:k].T
    return F.pad(out, (0, k - out.shape[1]))


def nearest(x: torch.Tensor, k: int, block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's k nearest other rows by cosine of the centred rows: (item ids [N, k], 1-based; cosines [N, k]).
    Blocks of rows, so memory is block x N, not N x N."""
    x = F.normalize(x - x.mean(0), dim=1)
    k = min(k, len(x) - 1)
    ids, cos = [], []
    for b in range(0, len(x), block):
        c = x[b:b + block] @ x.T
        c[torch.arange(len(c)), torch.arange(b, b + len(c))] = float("-inf")  # not itself
        v, i = c.topk(k, dim=1)
        ids.append(i + 1)
        cos.append(v)
    return torch.cat(ids), torch.cat(cos)


def tfidf(texts: list[str]):
    """Each item's TF-IDF text vector (word unigrams, sublinear tf, rows at unit L2 norm) as a scipy CSR matrix [N, V]:
    what two titles share word for word. The vocabulary and idf read item content only, never interactions."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    return TfidfVectorizer(sublinear_tf=True).fit_transform(texts).tocsr().astype(np.float32)


def tfidf_nearest(texts: list[str], k: int, block: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """--residual-text tfidf: each item's k nearest other items by the cosine of their TF-IDF vectors (ids [N, k],
    1-based; cosines [N, k]), as nearest() does for dense rows."""
    x = tfidf(texts)
    k = min(k, x.shape[0] - 1)
    ids, cos = [], []
    for b in range(0, x.shape[0], block):
        c = torch.from_numpy((x[b:b + block] @ x.T).toarray())
        c[torch.arange(len(c)), torch.arange(b, b + len(c))] = float("-inf")  # not itself
        v, i = c.topk(k, dim=1)
        ids.append(i + 1)
        cos.append(v)
    return torch.cat(ids), torch.cat(cos)


def semantic_tables(cfg: Config, views: list[str], fused: dict | None, sem: dict | None) -> dict[str, torch.Tensor]:
    """The frozen content table behind each view, [N, df], at unit mean norm (so the adapter's scale does not depend on
    where the table came from). --semantic fused reads stage 3's h_A / h_B; raw reads stage 1 directly: A = the mean of
    the item's MLLM description vectors (zeros when it has none), B = its pooled original text; both concatenates the
    two, so the fused view keeps the frozen content beside it (pre-training on interactions cannot wash it out)."""
    if cfg.semantic in ("raw", "both"):
        m = sem["view_mask"].float()[..., None]
        raw = {"A": (sem["view_emb"].float() * m).sum(1) / m.sum(1).clamp_min(1.0), "B": sem["text_pooled"].float()}
    out = {}
    for v in views:
        h = {"raw": lambda: raw[v], "fused": lambda: fused["h_" + v].float(),
             "both": lambda: torch.cat([fused["h_" + v].float(), raw[v]], 1)}[cfg.semantic]()
        h = whiten(h) if cfg.whiten else h
        out[v] = h / h.norm(dim=-1).mean().clamp_min(1e-8)
    return out


class ItemEncoder(nn.Module):
    """Item ids -> one vector per view, [..., V, d]. Id 0 (padding) maps to zeros; id N+1 is BERT4Rec's mask token.

    Views: ["id"] (ID embedding only) or a subset of ["A", "B"]: adapter(h_view) + gate_i * ID_i, where h_A / h_B are
    the frozen content tables (or stage 3's fusion module, recomputed, when fine-tuned) and the ID part can be dropped
    per view (--id-free, --no-id-emb), gated by training popularity (--id-gate) or started from PCA (--id-init pca).
    """

    def __init__(self, cfg: Config, n_items: int, views: list[str], fused: dict | None, sem: dict | None = None,
                 pop: np.ndarray | None = None, texts: list[str] | None = None):
        super().__init__()
        d, scale = cfg.hidden, cfg.init_scale
        self.n, self.d, self.views = n_items, d, views
        V = len(views)
        free = {v.strip() for v in cfg.id_free.split(",") if v.strip()}
        with_id = [v == "id" or (cfg.id_emb and v not in free) for v in views]
        self.with_id = with_id
        self.emb = nn.Embedding(n_items + 2, V * d, padding_idx=0) if any(with_id) else None
        tables = semantic_tables(cfg, views, fused, sem) if views != ["id"] else None  # fine-tuned: for the PCA start
        if self.emb is not None:
            nn.init.normal_(self.emb.weight, std=scale / math.sqrt(d))
            with torch.no_grad():
                if cfg.id_init == "pca" and tables is not None:  # content-shaped start, at the random init's scale
                    for k, v in enumerate(views):
                        p = pca(tables[v], d)
                        self.emb.weight[1:n_items + 1, k * d:(k + 1) * d] = p * (scale / math.sqrt(d) / p.std())
                self.emb.weight[0].zero_()
        self.mask_vec = nn.Parameter(torch.randn(V, d) * scale / math.sqrt(d))
        # how much of the ID part enters, per item and view: 0 in a content-only view; the popularity gate makes a rare
        # item lean on its content, whose adapter is shared with every item, instead of an ID vector it barely trained
        gate = torch.tensor([float(w) for w in with_id]).expand(n_items + 2, V).clone()
        if cfg.id_gate > 0:
            p = torch.as_tensor(pop, dtype=torch.float32)
            gate[1:n_items + 1] *= (p / (p + cfg.id_gate))[:, None]
        self.register_buffer("id_scale", None if bool((gate == 1).all()) else gate, persistent=False)
        self.id_dropout = cfg.id_dropout if views != ["id"] else 0.0  # without content a dropped item is nothing
        self.fusion = None
        # buffers near_ids / near_cos [N + 2, K], rows 0 and N + 1 empty; the plain backbone has no content to use
        self.near = cfg.content_residual and views != ["id"]
        self.rare = self.near and cfg.residual_rare
        self.query = self.near and cfg.residual_query
        if self.near:
            # A d-wide adapter keeps little of what tells near-duplicate items apart (on Beauty's titles the cosine to
            # the last item keeps 63% of its tail NDCG@10 through a 32-d PCA, 78% through 64-d, all at full width): the
            # last content view also scores by the full-width cosine of its frozen vectors, kept for the K nearest
            # --residual-text tfidf: the same term over lexical overlap (on Beauty's titles the TF-IDF cosine to the
            # last item ranks validation targets 25% better than the sentence encoder's)
            ids, cos = (tfidf_nearest(texts, cfg.residual_k) if cfg.residual_text == "tfidf"
                        else nearest(tables[views[-1]], cfg.residual_k))
            pad = lambda t: torch.cat([t.new_zeros(1, t.shape[1]), t, t.new_zeros(1, t.shape[1])])
            self.register_buffer("near_ids", pad(ids), persistent=False)
            self.register_buffer("near_cos", pad(cos), persistent=False)
            self.near_weight = nn.Parameter(torch.tensor(1.0))
            # --residual-lags: earlier items read get their own weight, started at half the next one's (a user's
            # recent items say more about the next one than older ones do)
            if cfg.residual_lags > 1:
                self.near_lag_weight = nn.Parameter(0.5 ** torch.arange(1.0, cfg.residual_lags))
            # --residual-rare: a candidate's cosine weighs (1 + u x rarity); --residual-query: the item read's cosines
            # weigh (1 + u' x its rarity); rows 0 and N + 1 (no item) are 0
            if self.rare or self.query:
                lp = torch.log1p(torch.as_tensor(pop, dtype=torch.float32))
                self.register_buffer("rarity", F.pad(1 - lp / lp.max().clamp_min(1e-8), (1, 1)), persistent=False)
            if self.rare:
                self.near_rare = nn.Parameter(torch.tensor(0.0))
            if self.query:
                self.near_query = nn.Parameter(torch.tensor(0.0))
        if views != ["id"]:
            widths = [(fused["h_" + v] if cfg.finetune_fusion else tables[v]).shape[1] for v in views]
            self.adapters = nn.ModuleList(nn.Linear(w, d) for w in widths)
            if cfg.finetune_fusion:
                self.fusion = load_fusion_module(fused)
                # inputs are data, not weights: kept out of model.pt (persistent=False); fused.pt holds them
                for k in ("coarse", "coarse_mask", "fine", "fine_mask"):
                    self.register_buffer("in_" + k, fused["inputs"][k], persistent=False)
            else:
                for v in views:  # padding row 0 and mask row N+1 read zeros
                    h = tables[v]
                    self.register_buffer("h_" + v, torch.cat([h.new_zeros(1, h.shape[1]), h,
                                                              h.new_zeros(1, h.shape[1])]), persistent=False)

    def content(self, ids) -> list[torch.Tensor]:  # [...] -> one [..., df] per view
        if self.fusion is None:
            return [getattr(self, "h_" + v)[ids] for v in self.views]
        uniq, inv = torch.unique(ids, return_inverse=True)
        rows = (uniq - 1).clamp(0, self.n - 1)  # pad / mask rows are computed on item 1 and zeroed below
        hA, hB = self.fusion(self.in_coarse[rows], self.in_coarse_mask[rows], self.in_fine[rows].float(),
                             self.in_fine_mask[rows])
        keep = ((uniq >= 1) & (uniq <= self.n))[:, None].to(hA.dtype)
        return [({"A": hA, "B": hB}[v] * keep)[inv] for v in self.views]

    def id_alignment(self, ids, tau: float) -> torch.Tensor:
        """--id-align: each content view's adapter output and the ID vector of the same item find each other among the
        given distinct items (symmetric InfoNCE). The adapter, shared by every item, learns to put content where
        training put the IDs of items it has seen often, so an item seen rarely gets a collaborative-looking vector
        from its content. The ID vector is that of the first view with an ID part (a content-only view has none)."""
        k = self.with_id.index(True)
        e = self.emb(ids)[:, k * self.d:(k + 1) * self.d]
        z = [a(h) for a, h in zip(self.adapters, self.content(ids))]
        return sum(0.5 * (common.info_nce(c, e, tau) + common.info_nce(e, c, tau)) for c in z) / len(z)

    def forward(self, ids):
        shape = (*ids.shape, len(self.views), self.d)
        x = 0
        if self.emb is not None:
            x = self.emb(ids).view(shape)
            x = x * self.id_scale[ids][..., None] if self.id_scale is not None else x
            if self.training and self.id_dropout > 0:
                # one draw per item for the whole call: a dropped item lacks its ID both where it was read and where
                # it is a candidate, as a cold item does
                keep = torch.rand(self.n + 2, device=ids.device) >= self.id_dropout
                x = x * keep[ids][..., None, None].to(x.dtype)
        if self.views != ["id"]:
            x = x + torch.stack([a(h) for a, h in zip(self.adapters, self.content(ids))], -2)
        x = torch.where((ids == self.n + 1)[..., None, None], self.mask_vec, x)
        return x * (ids != 0)[..., None, None].to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: backbones. One attention (common.attend), shared by SASRec (causal) and BERT4Rec; GRU4Rec
# ----------------------------------------------------------------------------------------------------------------------

def attention_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """[B, 1, L, L] bool, True = may attend: non-padding keys (and only earlier ones when causal).

    Every query also sees itself, so no row is fully masked: softmax stays finite (no NaN) even for padding queries,
    which read only their own (zeroed) state and are zeroed again after each block.
    """
    L = valid.shape[1]
    m = valid[:, None, None, :].expand(-1, 1, L, L)
    if causal:
        m = m & torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    return m | torch.eye(L, dtype=torch.bool, device=valid.device)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + ffn(LN(x)) (SASRec's point-wise two-layer FFN)."""

    def __init__(self, d: int, heads: int, dropout: float, attention: str):
        super().__init__()
        self.heads, self.p, self.attention = heads, dropout, attention
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(dropout), nn.Linear(d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask):
        B, L, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, L, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = attend(q, k, v, mask, self.p if self.training else 0.0, self.attention)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(B, L, d)))
        return x + self.drop(self.ffn(self.ln2(x)))


class Transformer(nn.Module):
    """SASRec (causal=True) and BERT4Rec (causal=False): learned positions, pre-LN blocks, padding kept at zero."""

    def __init__(self, d, blocks, heads, dropout, max_len, causal, attention, pos_std):
        super().__init__()
        self.causal, self.scale = causal, math.sqrt(d)
        self.pos = nn.Embedding(max_len, d)
        with torch.no_grad():  # nn.Embedding's N(0, 1) init, scaled in place (one draw, whatever the scale)
            self.pos.weight.mul_(pos_std)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout, attention) for _ in range(blocks))
        self.ln = nn.LayerNorm(d)

    def forward(self, x, valid):  # x [B, L, d] item vectors, valid [B, L] -> [B, L, d]
        L = x.shape[1]
        keep = valid[..., None].to(x.dtype)
        # right-aligned: column j of a batch trimmed to L columns is absolute position max_len - L + j
        x = self.drop(x * self.scale + self.pos.weight[-L:]) * keep
        mask = attention_mask(valid, self.causal)
        for b in self.blocks:
            x = b(x, mask) * keep
        return self.ln(x) * keep


class GRU(nn.Module):
    """GRU4Rec: a GRU over the sequence. Rows are rotated so padding comes last while the GRU runs, which makes each
    output independent of how much padding the batch has (and trivially causal)."""

    def __init__(self, d, layers, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.gru = nn.GRU(d, d, num_layers=layers, batch_first=True, dropout=dropout if layers > 1 else 0.0)

    def forward(self, x, valid):
        L = x.shape[1]
        shift = valid.sum(1, keepdim=True)  # right-aligned length
        left = (torch.arange(L, device=x.device) + L - shift) % L  # left-aligned position j reads column left[j]
        xl = x.gather(1, left[..., None].expand_as(x))
        h, _ = self.gru(self.drop(xl))
        back = (torch.arange(L, device=x.device) + shift) % L  # inverse rotation
        return self.drop(h.gather(1, back[..., None].expand_as(h))) * valid[..., None].to(h.dtype)


# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: the recommender: user state from the backbone, score = dot product with the item vectors
# ----------------------------------------------------------------------------------------------------------------------

class Recommender(nn.Module):
    """User state = backbone over each view's sequence of item vectors, concatenated; score = dot with item vectors."""

    def __init__(self, cfg: Config, n_items: int, views: list[str], fused: dict | None, sem: dict | None = None,
                 pop: np.ndarray | None = None, texts: list[str] | None = None):
        super().__init__()
        self.n = n_items
        self.items = ItemEncoder(cfg, n_items, views, fused, sem, pop, texts)
        self.bidirectional = cfg.backbone == "bert4rec"
        if cfg.backbone == "gru4rec":
            self.backbone = GRU(cfg.hidden, cfg.blocks, cfg.dropout)
        else:
            self.backbone = Transformer(cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len,
                                        causal=cfg.backbone == "sasrec", attention=cfg.attention,
                                        pos_std=cfg.init_scale)

    def forward(self, seq, all_items: bool):
        """Training entry point (what DDP wraps): states, plus every item's vectors when the loss needs them all,
        computed once per step and shared by the input sequence and the output layer."""
        vecs = self.all_vectors() if all_items else None
        return self.states(seq, vecs), vecs

    def states(self, seq, vecs=None):
        """seq [B, L] item ids (right-aligned) -> [B, L, V*d]; position t depends on items <= t unless bidirectional.
        `vecs` = precomputed item vectors for every id (saves re-encoding the items when the loss needs them all)."""
        x = vecs[seq] if vecs is not None else self.items(seq)  # [B, L, V, d]
        B, L, V, d = x.shape
        # The dual view's shared backbone: each view's sequence becomes its own row of one [B*V, L, d] batch, so the
        # same weights encode every view; the V states of a position are then concatenated into the user vector.
        h = self.backbone(x.transpose(1, 2).reshape(B * V, L, d), (seq != 0).repeat_interleave(V, 0))
        return h.view(B, V, L, d).transpose(1, 2).reshape(B, L, V * d)

    def all_vectors(self):  # [N + 2, V, d] for ids 0..N+1
        return self.items(torch.arange(self.n + 2, device=self.items.mask_vec.device))

    def table(self, vecs=None):  # [N, V*d]: the scoring vectors of items 1..N (padding and mask token excluded)
        v = self.all_vectors() if vecs is None else vecs
        return v[1:self.n + 1].flatten(1)

    def near_terms(self, last):
        """The neighbours of the items read last, [R, m] (most recent first; [R] = the last one only; id 0 = none),
        and their cosines times each lag's weight: (ids [R, m*K], 1-based, 0 = empty slot; values [R, m*K])."""
        last = last[:, None] if last.dim() == 1 else last
        ids, cos = self.items.near_ids[last], self.items.near_cos[last]  # [R, m, K]
        w = self.items.near_weight[None]
        if last.shape[1] > 1:
            w = torch.cat([w, self.items.near_lag_weight[:last.shape[1] - 1]])
        v = w[:, None] * cos
        if self.items.query:  # --residual-query: by the rarity of the item read
            v = v * (1 + self.items.near_query * self.items.rarity[last])[..., None]
        if self.items.rare:  # --residual-rare
            v = v * (1 + self.items.near_rare * self.items.rarity[ids])
        return ids.flatten(1), v.flatten(1)

    def near_add(self, last):
        """--content-residual, the score term sum_j w_j * cosine(item, item read j steps back) as sparse (rows, cols,
        values), one entry per distinct (row, col), for user states that read `last` [R] or [R, m] last (see
        near_terms; cols 0-based); None when the term is off."""
        if not self.items.near:
            return None
        ids, v = self.near_terms(last)
        r, k = (ids != 0).nonzero(as_tuple=True)
        if last.dim() == 1 or last.shape[1] == 1:  # one item's neighbours are distinct
            return r, ids[r, k] - 1, v[r, k]
        # two items read can share a neighbour: their terms are summed into one entry
        key, inv = torch.unique(r * (self.n + 1) + ids[r, k], return_inverse=True)
        return key // (self.n + 1), key % (self.n + 1) - 1, v.new_zeros(len(key)).index_add(0, inv, v[r, k])

    def near_at(self, last, items):
        """The same term for given candidates: last [R] or [R, m], items [R, C] -> [R, C] (0 where it is off)."""
        if not self.items.near:
            return 0
        ids, v = self.near_terms(last)
        if self.n + 1 <= items.shape[1] * ids.shape[1]:  # cheaper: each row's terms spread over all items [R, N + 1]
            return v.new_zeros(len(ids), self.n + 1).scatter_add(1, ids, v).gather(1, items)
        hit = ids[:, None, :] == items[:, :, None]  # [R, C, m*K]; id 0 (empty slot) never matches an item
        return (hit * v[:, None, :]).sum(-1)

    @staticmethod
    def score(h, table):
        """The recommendation score: user states [B, V*d] . item vectors [N, V*d] -> [B, N]. Both sides are the views
        concatenated, so a score is the sum of the per-view dot products. Evaluation's chunked ranking, the hand-written
        loss and top_k compute the same product into their own buffers."""
        return h @ table.T


# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: losses, summed over the predicted positions
# ----------------------------------------------------------------------------------------------------------------------

def ce_loss_sum(h, table, target, chunk: int = 0, exclude=None, add=None):
    """sum over positions of -log softmax(score(h, items))[target]: the softmax cross-entropy over all items, target ids
    1-based (row r of `table` = item r+1). `exclude` = (rows, cols): score entries left out of the softmax (the user's
    own items under --exclude-seen; cols 0-based). `add` = (rows, cols, values): sparse terms added to the scores first
    (--content-residual; values may carry a gradient). The definition is the F.cross_entropy lines; SoftmaxCE below
    computes the same faster on CPU, and in chunks when asked (on a GPU torch's fused cross-entropy is faster)."""
    if h.is_cuda and not 0 < chunk < len(table):
        s = Recommender.score(h, table)
        s = s if add is None else s.index_put(add[:2], add[2].to(s.dtype), accumulate=True)
        return F.cross_entropy(mask_out(s, exclude), target - 1, reduction="sum")
    no = h.new_zeros(0)
    return SoftmaxCE.apply(h, table, target - 1, chunk, exclude, add[:2] if add else None, add[2] if add else no)


def add_at(s: torch.Tensor, add, c: int = 0) -> torch.Tensor:
    """Add the sparse `add` = (rows, cols, values) entries that fall in this block of scores (columns c .. c + width),
    in place (values detached: SoftmaxCE writes their gradient itself). The one step adding --content-residual's term
    to a score matrix, in the loss, the evaluation and the recommendations."""
    if add is not None:
        sel = (add[1] >= c) & (add[1] < c + s.shape[1])
        s[add[0][sel], add[1][sel] - c] += add[2][sel].detach().to(s.dtype)  # (row, col) pairs are distinct
    return s


def mask_out(s: torch.Tensor, exclude, c: int = 0) -> torch.Tensor:
    """Set the `exclude` = (rows, cols) entries that fall in this block of scores (columns c .. c + width) to -inf, in
    place: no probability, no gradient, never ranked above anything. The one masking step of loss and evaluation."""
    if exclude is not None:
        sel = (exclude[1] >= c) & (exclude[1] < c + s.shape[1])
        s[exclude[0][sel], exclude[1][sel] - c] = float("-inf")
    return s


def own_items(hist: torch.Tensor, target: torch.Tensor, causal: bool, mask_id: int = -1):
    """(rows, cols) of the items each row has read and that are not its target, cols 0-based: what --exclude-seen
    leaves out. hist [R, L] item ids (0 = padding); target [R] (one per row) or [R, L] (one per position: the rows
    are then the positions, row-major, and `causal` limits each to the items at or before it)."""
    if target.dim() == 1:
        r, c = (hist != 0).nonzero(as_tuple=True)
        keep = hist[r, c] != target[r]
        return r[keep], hist[r, c][keep] - 1
    pos = target != 0
    rid = pos.flatten().cumsum(0).view_as(pos) - 1
    L = hist.shape[1]
    ctx = hist[:, None, :].expand(-1, L, -1)  # [R, position, read item]
    ok = pos[:, :, None] & (ctx != 0) & (ctx != mask_id) & (ctx != target[:, :, None])
    if causal:
        ok &= torch.ones(L, L, dtype=torch.bool, device=hist.device).tril()
    b, t, j = ok.nonzero(as_tuple=True)
    return rid[b, t], ctx[b, t, j] - 1


def bce_loss_sum(h, model, target, neg, vecs, prior=None, last=None):
    """sum over positions of -log sigmoid(score(target)) - log(1 - sigmoid(score(negative))), one sampled negative per
    position; each position scores only its two items, so the product is row-wise, not the full score matrix.
    `prior` [N + 1] by item id is added to both scores (--pop-adjust); `last` [positions, m] = the items each position
    read last, most recent first, for --content-residual's term."""
    pos_v = vecs[target].flatten(1) if vecs is not None else model.items(target).flatten(1)
    neg_v = vecs[neg].flatten(1) if vecs is not None else model.items(neg).flatten(1)
    pos_s, neg_s = (h * pos_v).sum(-1), (h * neg_v).sum(-1)
    if last is not None and model.items.near:
        near = model.near_at(last, torch.stack([target, neg], 1))
        pos_s, neg_s = pos_s + near[:, 0], neg_s + near[:, 1]
    if prior is not None:
        pos_s, neg_s = pos_s + prior[target], neg_s + prior[neg]
    return F.softplus(-pos_s).sum() + F.softplus(neg_s).sum()  # = BCE(pos, 1) + BCE(neg, 0)


# ----------------------------------------------------------------------------------------------------------------------
# Speed, tested equal: the softmax cross-entropy with a hand-written gradient (tests/test_backbone.py)
# ----------------------------------------------------------------------------------------------------------------------

class SoftmaxCE(torch.autograd.Function):
    """sum_i -log softmax(h_i . W^T)[y_i], with the gradient written by hand: d/dlogits = softmax - onehot.

    Why not F.cross_entropy(h @ W.T, y): on CPU a ce step is dominated by elementwise passes over the [positions, items]
    logits, not by the matmuls, and autograd's log_softmax + nll makes about twice as many passes as needed. Here the
    logits buffer becomes exp(logits - max) in place and is kept; the softmax normalisation and the one-hot are
    applied to the small [M, d] / [N, d] products in backward (bench/bench_backbone.py prints the speed ratio).
    tests/test_backbone.py checks loss and gradients against F.cross_entropy.
    Chunked (chunk > 0), only each row's log-sum-exp is kept and backward recomputes each chunk's logits, so memory is
    positions x chunk, not positions x items (torch has no chunked cross-entropy).
    """

    @staticmethod
    def forward(ctx, h, W, y, chunk, exclude=None, near=None, near_v=None):
        ctx.chunk = chunk = chunk if 0 < chunk < len(W) else 0
        ctx.exclude, ctx.near = exclude, near
        add = None if near is None else (*near, near_v)
        picked = (h * W[y]).sum() + (0 if near is None else near_v[near[1] == y[near[0]]].sum())
        if chunk == 0:
            z = mask_out(add_at(h @ W.T, add), exclude)
            mx = z.max(1, keepdim=True).values
            z.sub_(mx).exp_()
            s = z.sum(1, keepdim=True)
            ctx.save_for_backward(h, W, y, z, s)
            return (mx + s.log()).sum() - picked
        lse = torch.full((len(h),), float("-inf"), device=h.device, dtype=h.dtype)
        for c in range(0, len(W), chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(mask_out(add_at(h @ W[c:c + chunk].T, add, c), exclude, c), 1))
        ctx.save_for_backward(h, W, y, lse, near_v)
        return lse.sum() - picked

    @staticmethod
    def backward(ctx, g):
        near = ctx.near  # the added terms' gradient: softmax probability at their entry - 1 at the target
        dv = None if near is None else -(near[1] == ctx.saved_tensors[2][near[0]]).to(ctx.saved_tensors[0].dtype)
        if ctx.chunk == 0:
            h, W, y, z, s = ctx.saved_tensors
            dh = (z @ W) / s - W[y]
            dW = (z.T @ (h / s)).index_add_(0, y, -h)
            if near is not None:
                dv = (dv + z[near] / s[near[0], 0]) * g
            return dh * g, dW * g, None, None, None, None, dv
        h, W, y, lse, near_v = ctx.saved_tensors
        add = None if near is None else (*near, near_v)
        dh, dW = -W[y], torch.zeros_like(W).index_add_(0, y, -h)
        for c in range(0, len(W), ctx.chunk):
            p = torch.exp(mask_out(add_at(h @ W[c:c + ctx.chunk].T, add, c), ctx.exclude, c) - lse[:, None])
            dh += p @ W[c:c + ctx.chunk]
            dW[c:c + ctx.chunk] += p.T @ h
            if near is not None:
                sel = (near[1] >= c) & (near[1] < c + ctx.chunk)
                dv[sel] += p[near[0][sel], near[1][sel] - c]
        return dh * g, dW * g, None, None, None, None, None if dv is None else dv * g


# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: training. Epochs of (global) batches, validation each --eval-every epochs, the best epoch tested once
# ----------------------------------------------------------------------------------------------------------------------

@dataclass
class TrainData:
    """What training and evaluation read, built once with numpy (the per-batch path is pure indexing)."""
    train_seqs: list  # per user, the training part of the sequence (validation and test items removed)
    eval_users: np.ndarray  # users with a validation and a test item
    tr: np.ndarray  # [U, L or L+1] right-aligned training sequences of the users with something to predict
    tr_len: np.ndarray  # [U] predicted positions per sequence
    tr_users: np.ndarray  # [U] their user rows
    keys: np.ndarray  # sorted user * (N + 1) + item over the training items (bce negatives avoid them)
    valid: tuple  # (right-aligned histories, targets, sampled negatives) of the eval users
    test: tuple  # the same for test: built here, read only once, after training, by the best-epoch model
    n_neg: int  # sampled negatives per user (fewer than --n-neg when the catalogue is small)
    scored: np.ndarray | None = None  # --train-items seen: the sorted ids the loss ranks (None: every item)
    valid_seen: np.ndarray | None = None  # --exclude-seen: right-aligned whole histories before the validation target
    test_seen: np.ndarray | None = None  # and before the test target
    pop: np.ndarray | None = None  # [N + 1] training interactions by item id (--id-gate, --pop-adjust)


@dataclass
class Run:
    """The fixed context of one training run, which every training function reads."""
    cfg: Config
    ds: common.Dataset
    data: TrainData
    views: list
    model: Recommender
    ddp: nn.Module | None  # the model, wrapped in DistributedDataParallel under torchrun
    opt: torch.optim.Optimizer
    device: torch.device
    rank: int
    world: int
    out_dir: Path


@dataclass
class Progress:
    """The state a run carries across epochs: what last.pt stores and --resume restores."""
    curve: list = field(default_factory=list)
    best: float = -1.0
    best_epoch: int = 0
    best_state: dict | None = None
    bad: int = 0  # evaluations since the last improvement
    train_seconds: float = 0.0
    sequences_seen: int = 0
    resumed_after: list = field(default_factory=list)


def train(cfg: Config) -> dict:
    """Train, pick the epoch on validation, test it once; writes DATA/runs/<name>/ and returns results.json's dict."""
    world, rank, device = setup_distributed(cfg)
    common.seed_everything(cfg.seed, device)
    views, fused_path, mode = resolve_views(cfg)
    ds = common.load_dataset(cfg.data, check_images=False)
    fused = load_fused(fused_path, ds) if fused_path and cfg.semantic != "raw" else None
    sem_path = Path(cfg.semantics) if cfg.semantics else Path(cfg.data) / "semantics.pt"
    need_sem = fused_path is not None and cfg.semantic != "fused"
    sem = load_semantics(sem_path, ds) if need_sem or (cfg.content_grid and sem_path.is_file()) else None
    out_dir = Path(cfg.data) / "runs" / (cfg.name or f"{cfg.backbone}_{cfg.loss}_{mode}_s{cfg.seed}")
    log.info(f"dataset {cfg.data}: {ds.report} fingerprint {ds.fingerprint}; views {mode} {views}"
             + (f" from {fused_path if cfg.semantic == 'fused' else sem_path}" if fused_path else "")
             + f" ({cfg.semantic}); world {world}, device {device}")
    common.log_config(cfg)
    data = build_data(cfg, ds)

    model = Recommender(cfg, ds.n_items, views, fused, sem, data.pop[1:], ds.texts()).to(device)
    ddp = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay)
    log.info(f"model: {sum(p.numel() for p in model.parameters()):,} parameters; {len(data.tr)} training sequences, "
             f"{len(data.eval_users)} evaluation users, {data.n_neg} sampled negatives each")
    if cfg.batch_size < world:
        raise SystemExit(f"--batch-size {cfg.batch_size} is smaller than the number of ranks {world}")
    run = Run(cfg, ds, data, views, model, ddp, opt, device, rank, world, out_dir)
    del ddp  # run.ddp is the only reference: released before the process group below

    stop = catch_stop_signals()
    out_dir.mkdir(parents=True, exist_ok=True)
    progress, start = resume_progress(run)
    stopped_by = fit(run, progress, start, stop)

    model.load_state_dict(progress.best_state)  # test, once, with the best-epoch weights
    results = final_test(run, progress, sem, mode, fused_path, stopped_by)
    if world > 1:
        # DDP's reducer holds the process group and sits in a reference cycle: left to the interpreter's exit, gloo
        # tears down there and aborts the rank (SIGABRT after results.json was written). Free it before the group.
        run.ddp = None
        gc.collect()
        dist.destroy_process_group()
    return results


def setup_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """(world size, rank, device): torchrun sets the environment; a plain run is world 1, with no collective call."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = common.pick_device(cfg.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if rank != 0:
            log.setLevel("WARNING")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return world, rank, device


def build_data(cfg: Config, ds: common.Dataset) -> TrainData:
    """Training sequences (right-aligned, one extra column for next-item targets), evaluation inputs and negatives."""
    N, bert, L = ds.n_items, cfg.backbone == "bert4rec", cfg.max_len
    train_seqs, eval_users = ds.split()
    if bert:  # cloze: every training sequence is input and target at once
        tr, tr_len = right_aligned(train_seqs, L)
    else:  # next item: input = items[:-1], target = items[1:]
        tr, tr_len = right_aligned(train_seqs, L + 1)
        tr_len = tr_len - 1
    keep = tr_len >= 1  # users with something to predict
    hist_len = L - 1 if bert else L  # BERT4Rec appends the mask token after the history
    val_hist, _ = right_aligned([train_seqs[u] for u in eval_users], hist_len)
    val_tgt = np.array([ds.seqs[u][-2] for u in eval_users], dtype=np.int64)
    test_hist, _ = right_aligned([ds.seqs[u][:-1] for u in eval_users], hist_len)
    test_tgt = np.array([ds.seqs[u][-1] for u in eval_users], dtype=np.int64)
    n_neg = min(cfg.n_neg, N - max((len(np.unique(ds.seqs[u])) for u in eval_users), default=0))
    # validation negatives avoid the user's items up to the validation target, test negatives all of them: drawn from
    # one seeded stream they differ only where a draw hit the test item, and nothing in model selection depends on test
    val_negs = sample_eval_negatives([ds.seqs[u][:-1] for u in eval_users], N, n_neg, cfg.eval_seed)
    negs = sample_eval_negatives([ds.seqs[u] for u in eval_users], N, n_neg, cfg.eval_seed)
    if n_neg < cfg.n_neg:
        log.warning(f"only {n_neg} negatives per user fit this catalogue (asked {cfg.n_neg})")
    seen = np.unique(np.concatenate(train_seqs))
    scored = seen if cfg.train_items == "seen" and len(seen) < N else None
    if scored is not None:
        log.info(f"--train-items seen: the loss ranks the {len(seen)} items seen in training ({N - len(seen)} never "
                 "seen there are ranked in evaluation all the same)")
    own = [[train_seqs[u] for u in eval_users], [ds.seqs[u][:-1] for u in eval_users]] if cfg.exclude_seen else None
    own = [right_aligned(x, max(map(len, x), default=1))[0] for x in own] if own else [None, None]
    pop = np.bincount(np.concatenate(train_seqs), minlength=N + 1)  # training interactions only
    return TrainData(train_seqs, eval_users, tr[keep], tr_len[keep], np.flatnonzero(keep),
                     user_item_keys(train_seqs, N), (val_hist, val_tgt, val_negs), (test_hist, test_tgt, negs), n_neg,
                     scored, *own, pop)


def epoch_draws(cfg: Config, data: TrainData, rng: np.random.Generator, N: int):
    """One epoch's randomness for all training sequences at once (vectorised): BERT4Rec's cloze masks and bce's
    negatives (one per predicted position, resampled where a draw hit one of the user's training items)."""
    tr, bert = data.tr, cfg.backbone == "bert4rec"
    width = tr.shape[1] - (0 if bert else 1)
    valid_pos = (tr[:, -width:] != 0) if bert else (tr[:, :-1] != 0)
    cloze = negatives = None
    if bert:
        cloze = (rng.random(tr.shape) < cfg.mask_prob) & valid_pos
        cloze[~cloze.any(1), -1] = True  # at least one prediction per sequence: the last item
    if cfg.loss == "bce":
        def draw(size):  # uniform over the items the loss ranks
            return rng.integers(1, N + 1, size=size) if data.scored is None else \
                data.scored[rng.integers(0, len(data.scored), size=size)]
        negatives = draw((len(tr), width))
        for _ in range(10):  # the few draws that hit one of the user's own items
            hit = membership(data.tr_users, negatives, data.keys, N) & valid_pos
            if not hit.any():
                break
            negatives[hit] = draw(int(hit.sum()))
    return cloze, negatives


def step_loss(run: Run, rows: np.ndarray, cloze, negatives, norm: float) -> torch.Tensor:
    """Loss summed over this rank's rows of the global batch, divided by `norm` (the epoch's mean number of
    predicted positions per global batch) and multiplied by the world size, so that DDP's gradient average
    equals the single-process gradient of the whole batch."""
    cfg, data, model, device = run.cfg, run.data, run.model, run.device
    bert = cfg.backbone == "bert4rec"
    Lb = int(data.tr_len[rows].max()) if len(rows) else 1
    x = torch.from_numpy(data.tr[rows][:, -(Lb + (0 if bert else 1)):]).to(device)
    need_all = cfg.loss == "ce" or model.items.fusion is None  # cheap unless the fusion module is fine-tuned
    if bert:
        m = torch.from_numpy(cloze[rows][:, -Lb:]).to(device)
        inp, tgt, pos = x.masked_fill(m, model.n + 1), x, m
    else:
        inp, tgt = x[:, :-1], x[:, 1:]
        pos = inp != 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
        h, vecs = run.ddp(inp, need_all)
    if cfg.amp:  # softmax over thousands of items in bf16 loses the small probabilities: loss in float32
        h, vecs = h.float(), (vecs.float() if vecs is not None else None)
    # --exclude-seen: each position's softmax leaves out the items it has read (BERT4Rec: the row's unmasked items)
    own = own_items(inp, tgt.masked_fill(~pos, 0), not bert, model.n + 1) if cfg.exclude_seen else None
    # --content-residual: the items each position read last (BERT4Rec: those left of it) pick the position's term
    last = None  # (the plain backbone has no such term)
    if model.items.near:
        read = F.pad(inp[:, :-1], (1, 0)) if bert else inp
        last = torch.stack([F.pad(read, (j, 0))[:, :read.shape[1]] for j in range(cfg.residual_lags)], -1)[pos]
    h, t = h[pos], tgt[pos]  # only non-padding (or masked) positions reach the output layer
    # --id-align: over the distinct items this batch predicts (each has training interactions), float32 like the loss
    align = 0  # (the plain backbone has no content to align: no effect with --views id)
    if cfg.id_align and model.items.views != ["id"]:
        align = cfg.id_align * model.items.id_alignment(torch.unique(t), cfg.id_align_tau)
    prior = None
    if cfg.pop_adjust:  # logit adjustment (Menon et al. 2021): the prior enters the training scores, not the model's
        prior = cfg.pop_adjust * torch.log1p(torch.from_numpy(data.pop).float()).to(device)
    if cfg.loss == "ce":
        table = model.table(vecs)
        if prior is not None:  # score + prior_i as one more dot-product dimension: [h, 1] . [item_i, prior_i]
            h, table = torch.cat([h, h.new_ones(len(h), 1)], 1), torch.cat([table, prior[1:, None]], 1)
        add = model.near_add(last)
        if data.scored is not None:  # --train-items seen: the softmax runs over the items training has seen
            keep = torch.from_numpy(data.scored).to(device)
            table, t = table[keep - 1], torch.searchsorted(keep, t) + 1
            own = own if own is None else (own[0], torch.searchsorted(keep, own[1] + 1))
            if add is not None:  # neighbours never seen in training leave with their column
                k = torch.isin(add[1] + 1, keep)
                add = (add[0][k], torch.searchsorted(keep, add[1][k] + 1), add[2][k])
        loss = ce_loss_sum(h, table, t, cfg.ce_chunk, own, add)
    else:
        neg = torch.from_numpy(negatives[rows][:, -Lb:]).to(device)[pos]
        loss = bce_loss_sum(h, model, t, neg, vecs, prior, last)
    # under torchrun each rank aligns its own rows' items; DDP's gradient average then averages the ranks' terms
    return loss * (run.world / norm) + align


def train_epoch(run: Run, epoch: int) -> tuple[dict, int]:
    """One pass over the training sequences: the epoch's curve row and the number of sequences it read."""
    cfg, data, bert = run.cfg, run.data, run.cfg.backbone == "bert4rec"
    rng = np.random.default_rng([cfg.seed, epoch])  # the same stream on every rank: same global batches
    t0, c0 = time.perf_counter(), time.process_time()
    run.ddp.train()
    cloze, negatives = epoch_draws(cfg, data, rng, run.model.n)
    batches = batch_order(data.tr_len, cfg.batch_size, rng, cfg.bucket)
    # One constant divisor per epoch, not each batch's own position count: bucketed batches hold similar lengths, so a
    # per-batch mean would weight a position in a batch of short histories up to 10x more than one in a batch of long
    # ones; the constant weighs every position alike, as unbucketed batches do.
    norm = max(float(cloze.sum() if bert else data.tr_len.sum()) / len(batches), 1.0)
    batches = batches[:cfg.max_batches] if cfg.max_batches > 0 else batches
    total, n_pos = 0.0, 0
    bar = tqdm(batches, desc=f"epoch {epoch}", leave=False, unit="batch", disable=run.rank != 0, mininterval=2)
    for gb in bar:
        counts = (cloze[gb].sum() if bert else (data.tr_len[gb]).sum())
        rows = gb[run.rank::run.world]  # DistributedSampler-style stride over the global batch
        loss = step_loss(run, rows, cloze, negatives, norm)
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        total += loss.item() * norm / run.world
        n_pos += int(counts)
        bar.set_postfix(loss=f"{total / max(n_pos, 1):.4f}", refresh=False)
    if run.world > 1:
        t_loss = torch.tensor([total], dtype=torch.float64, device=run.device)
        dist.all_reduce(t_loss)
        total = float(t_loss)
    dt = time.perf_counter() - t0
    n_seq = sum(len(b) for b in batches)
    # CPU seconds of this process (all threads) beside wall seconds: on a shared machine wall time measures the load
    row = {"epoch": epoch, "loss": total / max(n_pos, 1), "train_seconds": dt, "seq_per_s": n_seq / dt,
           "train_cpu_seconds": time.process_time() - c0}
    if run.model.items.near:  # --content-residual: how much the learned term weighs
        row["near_weight"] = run.model.items.near_weight.item()
        if cfg.residual_lags > 1:
            row["near_lag_weight"] = run.model.items.near_lag_weight.tolist()
        if cfg.residual_rare:
            row["near_rare"] = run.model.items.near_rare.item()
        if cfg.residual_query:
            row["near_query"] = run.model.items.near_query.item()
    return row, n_seq


def validate(run: Run, p: Progress, row: dict) -> None:
    """Validation metrics into `row`; a better NDCG@10 on the --select protocol keeps the epoch's weights (and writes
    model.pt, so a crash loses nothing), else counts towards --patience."""
    cfg, epoch = run.cfg, row["epoch"]
    te = time.perf_counter()
    rf, rs = evaluate(run.model, *run.data.valid, cfg, run.device, cfg.backbone == "bert4rec", run.rank, run.world,
                      run.data.valid_seen)
    row["valid"] = protocol_metrics(rf, rs)
    row["eval_seconds"] = time.perf_counter() - te
    sel = SELECT[cfg.select]
    score = row["valid"][sel]["NDCG@10"]
    if score > p.best:
        p.best, p.best_epoch, p.bad = score, epoch, 0
        p.best_state = copy.deepcopy(run.model.state_dict())
        if run.rank == 0:
            save_checkpoint(run.out_dir / "model.pt", run.model, cfg, run.ds, run.views, p.best_epoch)
    else:
        p.bad += 1
    w = ""
    if "near_weight" in row:  # one learned weight per lag
        w = " content w " + ", ".join(f"{x:.2f}" for x in [row["near_weight"], *row.get("near_lag_weight", [])])
        w += f" rare u {row['near_rare']:.2f}" if "near_rare" in row else ""
        w += f" query u {row['near_query']:.2f}" if "near_query" in row else ""
    log.info(f"epoch {epoch:3d} loss {row['loss']:.4f} valid {cfg.select} NDCG@10 {score:.4f} HR@10 "
             f"{row['valid'][sel]['HR@10']:.4f} (best {p.best:.4f} @ {p.best_epoch}){w} | "
             f"{row['seq_per_s']:.0f} seq/s, train {row['train_seconds']:.1f}s, "
             f"eval {len(run.data.valid[1]) / row['eval_seconds']:.0f} users/s")


def fit(run: Run, p: Progress, start: int, stop: dict) -> str | None:
    """Epochs from `start` until --epochs, --patience or a signal; returns the name of the signal that stopped it."""
    cfg = run.cfg
    for epoch in range(start, cfg.epochs + 1 if p.bad < cfg.patience else start):
        row, n_seq = train_epoch(run, epoch)
        p.train_seconds += row["train_seconds"]
        p.sequences_seen += n_seq
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            validate(run, p, row)
        else:
            log.info(f"epoch {epoch:3d} loss {row['loss']:.4f} | {row['seq_per_s']:.0f} seq/s, "
                     f"train {row['train_seconds']:.1f}s")
        p.curve.append(row)
        stopping = agreed_signal(run, stop["signal"])
        if cfg.checkpoint_every > 0 and (epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs
                                         or p.bad >= cfg.patience or stopping):
            save_resume(run.out_dir / "last.pt", {
                "epoch": epoch, "model": run.model.state_dict(), "optimizer": run.opt.state_dict(), "best": p.best,
                "best_epoch": p.best_epoch, "bad": p.bad, "best_state": p.best_state, "curve": p.curve,
                "train_seconds": p.train_seconds, "sequences_seen": p.sequences_seen,
                "resumed_after": p.resumed_after}, cfg, run.ds, run.device, run.rank, run.world)
        if p.bad >= cfg.patience:
            log.info(f"no validation improvement in {cfg.patience} evaluations: stopping")
            return None
        if stopping and p.best_state is not None:
            log.warning(f"{stopping}: stopping after epoch {epoch}; testing the best epoch so far")
            return stopping
    return None


def catch_stop_signals() -> dict:
    """SIGINT / SIGTERM end training after the current epoch, which is checkpointed; the best weights so far are then
    tested and written. The returned dict's "signal" names the signal once one came."""
    stop = {"signal": None}

    def on_signal(num, _frame):
        stop["signal"] = signal.Signals(num).name
        if num == signal.SIGINT:  # a second Ctrl-C kills at once; a second SIGTERM is torchrun relaying the scheduler's
            signal.signal(num, signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    return stop


def agreed_signal(run: Run, stopping: str | None) -> str | None:
    """A signal may reach the ranks in different epochs: all stop after the same one. (Decided from the reduced value
    alone: a handler that runs while this rank waits in all_reduce counts next epoch.)"""
    if run.world == 1:
        return stopping
    sig = torch.tensor([signal.Signals[stopping].value if stopping else 0], device=run.device)
    dist.all_reduce(sig, op=dist.ReduceOp.MAX)
    return signal.Signals(int(sig)).name if int(sig) else None


def resume_progress(run: Run) -> tuple[Progress, int]:
    """The progress to continue from and the first epoch to run: from last.pt under --resume, else a fresh start."""
    last = run.out_dir / "last.pt"
    p, start = Progress(), 1
    ck = load_resume(last, run.cfg, run.ds, run.world) if run.cfg.resume else None
    if ck is not None:  # the epochs' own streams come from (seed, epoch): the state below is all a resumed run needs
        run.model.load_state_dict(ck["model"])
        run.opt.load_state_dict(ck["optimizer"])
        p = Progress(ck["curve"], ck["best"], ck["best_epoch"], ck["best_state"], ck["bad"], ck["train_seconds"],
                     ck["sequences_seen"], ck["resumed_after"] + [ck["epoch"]])
        start = ck["epoch"] + 1
        set_rng_state(ck["rng"][run.rank], run.device)
        log.info(f"resumed {last} after epoch {ck['epoch']} (best {p.best:.4f} @ {p.best_epoch})")
    if run.rank == 0:  # the leftovers of a write killed half-way (last.pt, model.pt or results.json: any of them)
        for tmp in run.out_dir.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)
    return p, start


def final_test(run: Run, p: Progress, sem, mode: str, fused_path, stopped_by) -> dict:
    """Test metrics of the loaded (best-epoch) model, the content match, and results.json (rank 0 writes it)."""
    cfg, data, device, bert = run.cfg, run.data, run.device, run.cfg.backbone == "bert4rec"
    test_hist, test_tgt, negs = data.test
    rf, rs = evaluate(run.model, test_hist, test_tgt, negs, cfg, device, bert, run.rank, run.world, data.test_seen)
    test = protocol_metrics(rf, rs)
    test["groups"] = group_metrics(rf, rs, data.train_seqs, data.eval_users, test_hist, test_tgt, run.ds.n_items, cfg)
    content, ranks = None, {"": (rf, rs)}
    if sem is not None and cfg.content_grid and run.rank == 0:
        content, more = content_match(run.model, sem, run.ds, data.train_seqs, data.eval_users, data.valid, data.test,
                                      cfg, device, bert)
        ranks.update(more)
    results = {
        "config": asdict(cfg), "backbone": cfg.backbone, "loss": cfg.loss, "views": mode, "seed": cfg.seed,
        "fused": str(fused_path) if fused_path else None,
        "dataset": {"path": str(Path(cfg.data).resolve()), "fingerprint": run.ds.fingerprint,
                    "report": run.ds.report},
        "protocol": protocol_text(cfg, run.ds.n_items, data.n_neg),
        "world_size": run.world, "epochs_run": len(p.curve), "best_epoch": p.best_epoch, "interrupted_by": stopped_by,
        "resumed_after_epochs": p.resumed_after,
        "valid": next(r["valid"] for r in p.curve if r["epoch"] == p.best_epoch), "test": test,
        "content_match": content, "curve": p.curve,
        "train_seconds": p.train_seconds, "sequences_per_second": p.sequences_seen / max(p.train_seconds, 1e-9),
        "peak_memory_mb": peak_memory_mb(device),
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"cpu, {torch.get_num_threads()} threads"),
    }
    if run.rank == 0:
        save_checkpoint(run.out_dir / "model.pt", run.model, cfg, run.ds, run.views, p.best_epoch)
        head = head_items(data.train_seqs, run.ds.n_items, cfg.head_frac)
        write_test_ranks(run.out_dir / "test_ranks.csv", run.ds, data.eval_users, test_tgt, head, ranks)
        common.write_text_atomic(run.out_dir / "results.json", [json.dumps(results, indent=1)])
        t, s = test["full"], test["sampled100"]
        log.info(f"test (best epoch {p.best_epoch}): full NDCG@10 {t['NDCG@10']:.4f} HR@10 {t['HR@10']:.4f} | "
                 f"sampled-{data.n_neg} NDCG@10 {s['NDCG@10']:.4f} HR@10 {s['HR@10']:.4f} "
                 f"-> {run.out_dir}/results.json")
    return results


def write_test_ranks(path: Path, ds, eval_users, target, head, ranks: dict) -> Path:
    """One row per test user: the target's rank under each protocol, for paired per-user comparisons of two runs
    (bench/compare.py --paired). Columns full, sampled100: the model as trained; cm_*: with the content match at the
    validation-chosen gamma; content_*: the content-only reference (both only where the run has semantics)."""
    cols = [(f"{k}_{p}" if k else p, r) for k, pair in ranks.items() for p, r in zip(("full", "sampled100"), pair)]
    lines = ["user_id,item_id,head_item," + ",".join(c for c, _ in cols) + "\n"]
    for n, u in enumerate(eval_users):
        lines.append(f"{ds.user_ids[u]},{ds.item_ids[target[n] - 1]},{int(head[target[n]])},"
                     + ",".join(str(int(r[n])) for _, r in cols) + "\n")
    return common.write_text_atomic(path, lines)


def protocol_text(cfg: Config, N: int, n_neg: int) -> dict:
    """results.json's statement of how the numbers were measured."""
    return {"split": "leave-one-out (last item test, second-to-last validation)",
            "full": f"rank among all {N} items (padding excluded"
                    + ("; the user's own earlier items excluded too" if cfg.exclude_seen else "")
                    + "), ties counted against the target",
            "sampled100": f"rank among the target + {n_neg} uniform negatives the user never interacted with, drawn "
                          f"once with seed {cfg.eval_seed} (validation: none of the items up to the validation target)",
            "selection": f"early stopping and best epoch on validation NDCG@10 ({SELECT[cfg.select]}); "
                         "test evaluated once"}


# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: evaluation (one ranking function, one metrics function), groups and the content match
# ----------------------------------------------------------------------------------------------------------------------

KS = (5, 10, 20)


def user_ndcg(ranks, k: int) -> np.ndarray:
    """Per-user NDCG@k with one relevant item: 1/log2(1 + rank) when the 1-based rank is <= k, else 0."""
    r = np.asarray(ranks, dtype=np.float64)
    return (r <= k) / np.log2(r + 1)


def rank_metrics(ranks) -> dict:
    """HR@k, NDCG@k and MRR from 1-based ranks, averaged over users."""
    r = np.asarray(ranks, dtype=np.float64)
    if len(r) == 0:
        return {}
    out = {}
    for k in KS:
        out[f"HR@{k}"] = float((r <= k).mean())
        out[f"NDCG@{k}"] = float(user_ndcg(r, k).mean())
    out["MRR"] = float((1 / r).mean())
    return out


def count_at_least(s, t) -> torch.Tensor:
    """#{j: s[b, j] >= t[b]} per row, overwriting s. Comparing into a float buffer and summing it is faster on CPU
    than summing a bool tensor, and exact: 0/1 counts stay integers in float32 up to 2^24 items per chunk."""
    return torch.ge(s, t, out=s).sum(1, dtype=torch.float64 if s.shape[1] >= 2 ** 24 else None).long()


def full_ranks(h, table, target, chunk: int = 0, exclude=None, add=None) -> torch.Tensor:
    """rank = 1 + #{items scoring above the target} + #{other items scoring exactly the same} (ties count against).

    Items are scored in chunks of `chunk` (0 = all at once), so memory is users x chunk, not users x items. Exact ties
    need the target's score computed bit for bit like the others: every chunk (the last one zero-padded) and the
    target scores go through the same [B, d] @ [d, chunk] product, and the target's own entry is discounted by index.
    `add` = sparse score terms (rows, cols, values) added before ranking (--content-residual).
    """
    N = table.shape[0]
    if chunk <= 0 or chunk >= N:
        s = mask_out(add_at(Recommender.score(h, table), add), exclude)  # exclude: never a candidate, never a target
        return count_at_least(s, s.gather(1, target[:, None] - 1))  # includes the target itself: the "1 +"
    pad = table.new_zeros(chunk, table.shape[1])
    rows = torch.arange(len(h), device=h.device)
    s = torch.empty(len(h), chunk, dtype=h.dtype, device=h.device)  # one buffer: fresh pages cost more than the matmul
    t = torch.empty(len(h), 1, dtype=h.dtype, device=h.device)
    for g in range(0, len(h), chunk):  # target scores: the targets of `chunk` rows laid out as one chunk
        tv = torch.cat([table[target[g:g + chunk] - 1], pad])[:chunk]
        t[g:g + chunk, 0] = torch.mm(h, tv.T, out=s)[rows[g:g + chunk], rows[g:g + chunk] - g]
    if add is not None:  # the target's own term, added the same way as in its chunk below
        at = add[1] == target[add[0]] - 1
        t.index_put_((add[0][at], torch.zeros_like(add[0][at])), add[2][at].to(t.dtype), accumulate=True)
    r = torch.ones(len(h), dtype=torch.long, device=h.device)
    for c in range(0, N, chunk):
        w = table[c:c + chunk]
        torch.mm(h, (w if len(w) == chunk else torch.cat([w, pad[len(w):]])).T, out=s)
        mask_out(add_at(s, add, c), exclude, c)
        own = (target - 1 >= c) & (target - 1 < c + chunk)
        r[own] -= (s[rows[own], target[own] - 1 - c] >= t[own, 0]).long()
        r -= (chunk - len(w)) * (t[:, 0] <= 0).long()  # zero padding scores 0: take back what it added
        r += count_at_least(s, t)
    return r


def sampled_ranks(h, table, target, negs, extra=0) -> torch.Tensor:
    """Rank of the target among itself + its fixed negatives (same tie rule), scored by one batched matmul; `extra`
    [B, 1 + negatives] is added to those scores (--content-residual's term)."""
    cand = torch.cat([target[:, None], negs], 1) - 1
    s = torch.bmm(table[cand], h[:, :, None])[..., 0] + extra
    return 1 + (s[:, 1:] >= s[:, :1]).sum(1)


def last_states(model, hist: np.ndarray, vecs, device, bert: bool) -> torch.Tensor:
    """User vectors [B, V*d] from right-aligned histories [B, L] (numpy): the backbone's state at the last position.
    Shared by evaluation and recommendation, so a recommended list ranks items exactly as the evaluation does."""
    x = torch.from_numpy(hist).to(device)
    if bert:  # BERT4Rec predicts the mask token appended after the history
        x = torch.cat([x, torch.full_like(x[:, :1], model.n + 1)], 1)
    x = x[:, (x != 0).any(0).nonzero()[0, 0]:]  # trim all-padding leading columns
    return model.states(x, vecs)[:, -1]


def user_states(model, hist, idx_all, cfg, device, bert: bool):
    """Yield (rows, last states [B, V*d]) for the right-aligned histories hist[idx_all], batched by similar length so
    trimming a batch's leading all-padding columns removes most of its padding."""
    vecs = model.all_vectors()
    idx_all = idx_all[np.argsort((hist[idx_all] != 0).sum(1), kind="stable")]
    for b in range(0, len(idx_all), cfg.eval_batch):
        idx = idx_all[b:b + cfg.eval_batch]
        yield idx, last_states(model, hist[idx], vecs, device, bert)


@torch.no_grad()
def evaluate(model, hist, target, negs, cfg, device, bert: bool, rank=0, world=1, seen=None):
    """Ranks of `target` given right-aligned histories `hist` ([E, L] numpy); users sharded across ranks. `seen`
    ([E, *] numpy, --exclude-seen): each user's whole history, whose items the full ranking leaves out."""
    was = model.training
    model.eval()
    table = model.table()
    mine = np.arange(rank, len(hist), world)
    out_m, out_f, out_s = [], [], []
    for idx, h in user_states(model, hist, mine, cfg, device, bert):
        t = torch.from_numpy(target[idx]).to(device)
        out_m.append(idx)
        own = None if seen is None else own_items(torch.from_numpy(seen[idx]).to(device), t, False)
        last = recent(hist[idx], cfg.residual_lags).to(device)
        out_f.append(full_ranks(h, table, t, cfg.eval_chunk, own, model.near_add(last)).cpu())
        negs_i = torch.from_numpy(negs[idx]).to(device)
        extra = model.near_at(last, torch.cat([t[:, None], negs_i], 1))
        out_s.append(sampled_ranks(h, table, t, negs_i, extra).cpu())
    parts = [(np.concatenate(out_m) if out_m else mine, torch.cat(out_f).numpy() if out_f else np.zeros(0, np.int64),
              torch.cat(out_s).numpy() if out_s else np.zeros(0, np.int64))]
    if world > 1:  # every rank gets every rank's shard, so all ranks take the same early-stopping decision
        local, parts = parts[0], [None] * world
        dist.all_gather_object(parts, local)
    rf, rs = np.zeros(len(hist), np.int64), np.zeros(len(hist), np.int64)
    for m, a, b in parts:
        rf[m], rs[m] = a, b
    model.train(was)
    return rf, rs


def protocol_metrics(rf, rs) -> dict:
    return {"full": rank_metrics(rf), "sampled100": rank_metrics(rs)}


def head_items(train_seqs, N, head_frac: float) -> np.ndarray:
    """[N + 1] bool: the most popular items by training interactions making up head_frac of the catalogue."""
    pop = np.bincount(np.concatenate(train_seqs), minlength=N + 1)[1:]
    head = np.zeros(N + 1, dtype=bool)
    head[1 + np.argsort(-pop, kind="stable")[:max(1, int(round(head_frac * N)))]] = True
    return head


def group_metrics(rf, rs, train_seqs, eval_users, hist, target, N, cfg) -> dict:
    """Long-tail groups: tail vs head target items (training popularity), short vs long users (history length)."""
    head = head_items(train_seqs, N, cfg.head_frac)
    n_head = int(head.sum())
    hl = (hist != 0).sum(1)
    short_len = cfg.short_len or int(np.median(hl))
    groups = {"head_items": head[target], "tail_items": ~head[target], "short_users": hl <= short_len,
              "long_users": hl > short_len}
    out = {g: {"users": int(m.sum()), **protocol_metrics(rf[m], rs[m])} for g, m in groups.items()}
    out["definition"] = {"head_items": f"top {cfg.head_frac:.0%} of items by training interactions ({n_head})",
                         "short_users": f"test history of at most {short_len} items"}
    return out


@torch.no_grad()
def content_match_ranks(model, hist, seen, target, negs, cosine, combos, tail, cfg, device, bert) -> dict:
    """Ranks under the training-free content-match term (EVIDENCE.md lever 5): score_j + (gamma + beta tail_j +
    delta q_u) * cos(t_j, t_last), t = the items' text vectors, t_last = the last history item's, tail [N] 0/1
    (training popularity), q_u = tail at the user's last item; cosine(ids [B]) -> [B, N]. The cosine is zeroed on the
    user's own items (`seen`, right-aligned), else the last item would match itself. Also the content-only reference,
    the cosine alone with the user's items excluded. {(gamma, beta, delta): (full, sampled), "content_only": (...)}"""
    was = model.training
    model.eval()
    by_tail, by_query = any(b for _, b, _ in combos), any(d for _, _, d in combos)
    table, tail = model.table(), tail.to(device) if by_tail or by_query else None
    out = {g: (np.zeros(len(hist), np.int64), np.zeros(len(hist), np.int64)) for g in [*combos, "content_only"]}
    for idx, h in user_states(model, hist, np.arange(len(hist)), cfg, device, bert):
        t = torch.from_numpy(target[idx]).to(device)
        cand = torch.cat([t[:, None], torch.from_numpy(negs[idx]).to(device)], 1) - 1
        own = torch.from_numpy(seen[idx]).to(device)
        c = F.pad(cosine(hist[idx, -1] - 1), (1, 0))  # column 0 = padding
        only = c.scatter(1, own, float("-inf"))[:, 1:]
        c = c.scatter_(1, own, 0.0)[:, 1:]
        ct = c * tail if by_tail else None
        cq = c * tail[torch.from_numpy(hist[idx, -1] - 1).to(device)][:, None] if by_query else None
        last = recent(hist[idx], cfg.residual_lags).to(device)
        s_model, buf = add_at(Recommender.score(h, table), model.near_add(last)), torch.empty_like(c)
        if cfg.exclude_seen:  # the model's own ranking leaves them out: so does every row built on it
            mask_out(s_model, own_items(own, t, False))
        for key in out:
            if key == "content_only":
                s = only
            else:
                s = torch.add(s_model, c, alpha=key[0], out=buf)
                if key[1]:
                    s.add_(ct, alpha=key[1])
                if key[2]:
                    s.add_(cq, alpha=key[2])
            sc = s.gather(1, cand)
            out[key][1][idx] = (1 + (sc[:, 1:] >= sc[:, :1]).sum(1)).cpu().numpy()
            out[key][0][idx] = count_at_least(s, sc[:, :1].clone()).cpu().numpy()  # overwrites s: last use
    model.train(was)
    return out


def content_match(model, sem, ds, train_seqs, eval_users, valid, test, cfg, device, bert) -> dict:
    """The inference-time content term, (gamma, beta, delta) chosen on validation NDCG@10 (the --select protocol;
    the smallest gamma, then beta, then delta, on a tie), then test once; plus the content-only reference. The model
    is not retrained: the run's own test figures stay the as-trained ones. Returns (results.json's entry, {"cm" |
    "content": per-user test ranks})."""
    if cfg.match_text == "tfidf":  # sparse [N, V]: each batch's rows times all items, densified per batch only
        x = tfidf(ds.texts())
        cosine = lambda ids: torch.from_numpy((x[ids] @ x.T).toarray()).to(device)
        about = "TF-IDF of each item's text (word unigrams, sublinear tf)"
    else:
        text = F.normalize(sem["text_pooled"].float(), dim=-1).to(device)
        cosine = lambda ids: text[torch.from_numpy(ids).to(device)] @ text.T
        about = "stage-1 pooled original item text (semantics.pt text_pooled)"
    gammas = [float(g) for g in cfg.content_grid.split(",")]
    betas = sorted({0.0, *(float(b) for b in cfg.match_tail.split(","))})
    deltas = sorted({0.0, *(float(b) for b in cfg.match_query.split(","))})
    combos = [(g, b, q) for g in gammas for b in betas for q in deltas]
    tail = torch.from_numpy(~head_items(train_seqs, ds.n_items, cfg.head_frac)[1:]).float()  # training interactions
    sel, out = SELECT[cfg.select], {}
    for split, (hist, tgt, negs) in (("valid", valid), ("test", test)):
        users = [ds.seqs[u][:-2] if split == "valid" else ds.seqs[u][:-1] for u in eval_users]
        seen, _ = right_aligned(users, max(len(x) for x in users))
        ranks = content_match_ranks(model, hist, seen, tgt, negs, cosine, combos, tail, cfg, device, bert)
        out[split] = {g: protocol_metrics(*r) for g, r in ranks.items()}
        if split == "valid":
            by = {k: out["valid"][k][sel]["NDCG@10"] for k in combos}
            gamma, beta, delta = best = max(combos, key=lambda k: (by[k], -k[0], -k[1], -k[2]))
        else:
            test_ranks = ranks
    res = {"text": about + ", cosine to the last history item, zeroed on the user's own items", "grid": gammas,
           "gamma": gamma, "valid_by_gamma": {g: by[g, 0.0, 0.0] for g in gammas}, "valid": out["valid"][best]}
    if len(betas) > 1 or len(deltas) > 1:
        res.update({"tail_grid": betas, "tail_weight": beta, "query_grid": deltas, "query_weight": delta,
                    "valid_by_combo": [[*k, v] for k, v in by.items()],
                    "tail": f"items outside the top {cfg.head_frac:.0%} by training interactions"})
    for key, g in (("test", best), ("content_only", "content_only")):
        res[key] = {**out["test"][g], "groups": group_metrics(*test_ranks[g], train_seqs, eval_users, test[0], test[1],
                                                              ds.n_items, cfg)}
    res["content_only"]["valid"] = out["valid"]["content_only"]
    t, c = res["test"]["full"], res["content_only"]["full"]
    log.info(f"content match: gamma {gamma:g}" + (f", tail +{beta:g}" if len(betas) > 1 else "")
             + (f", tail query +{delta:g}" if len(deltas) > 1 else "")
             + f" (validation {sel} NDCG@10 {by.get((0.0, 0.0, 0.0), 0):.4f} -> {by[best]:.4f}); test full "
             f"NDCG@10 {t['NDCG@10']:.4f} HR@10 {t['HR@10']:.4f}; content only {c['NDCG@10']:.4f}")
    return res, {"cm": test_ranks[best], "content": test_ranks["content_only"]}


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: data helpers. Right-aligned padded matrices, batches, negatives, all built with numpy
# ----------------------------------------------------------------------------------------------------------------------

def recent(hist: np.ndarray, m: int) -> torch.Tensor:
    """[R, m] int64: the last m items of right-aligned histories [R, L], most recent first (0 = none)."""
    return torch.from_numpy(hist[:, :-m - 1:-1].copy())  # a copy: torch takes no negative strides


def right_aligned(seqs: list[np.ndarray], length: int) -> tuple[np.ndarray, np.ndarray]:
    """[U, length] int64 with each sequence's last `length` items at the right end (0 = padding), and the lengths.

    Right alignment keeps the most recent item in the last column, so trimming a batch to its longest sequence
    (dropping leading all-padding columns) changes nothing the model computes.
    """
    lens = np.fromiter((min(len(s), length) for s in seqs), dtype=np.int64, count=len(seqs))
    out = np.zeros((len(seqs), length), dtype=np.int64)
    flat = np.concatenate([s[len(s) - n:] for s, n in zip(seqs, lens)]) if len(seqs) else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(len(seqs)), lens)
    cols = length - lens[rows] + (np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens))
    out[rows, cols] = flat
    return out, lens


def membership(user_rows: np.ndarray, items: np.ndarray, keys: np.ndarray, n_items: int) -> np.ndarray:
    """True where items[r, j] belongs to user user_rows[r]; `keys` = sorted user * (n_items + 1) + item."""
    q = user_rows.reshape(-1, *([1] * (items.ndim - 1))) * (n_items + 1) + items
    pos = np.searchsorted(keys, q).clip(max=len(keys) - 1)
    return keys[pos] == q


def user_item_keys(seqs: list[np.ndarray], n_items: int) -> np.ndarray:
    lens = np.array([len(s) for s in seqs])
    return np.unique(np.repeat(np.arange(len(seqs)), lens) * (n_items + 1) + np.concatenate(seqs))


def sample_eval_negatives(seqs: list[np.ndarray], n_items: int, n: int, seed: int) -> np.ndarray:
    """[U, n] distinct negatives per user, uniform over the items the user never interacted with (fixed seed).

    Vectorised rejection sampling: draw with replacement, drop the user's items and repeats (keeping the first
    occurrence, so the survivors stay a uniform sample without replacement), redraw the rows left short.
    """
    rng = np.random.default_rng(seed)
    keys = user_item_keys(seqs, n_items)
    out = np.zeros((len(seqs), n), dtype=np.int64)
    todo, extra = np.arange(len(seqs)), 2 * n + 16
    while len(todo):
        cand = rng.integers(1, n_items + 1, size=(len(todo), n + extra))
        bad = membership(todo, cand, keys, n_items)
        order = np.argsort(cand, axis=1, kind="stable")
        srt = np.take_along_axis(cand, order, 1)
        dup_sorted = np.zeros_like(bad)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        dup = np.zeros_like(bad)
        np.put_along_axis(dup, order, dup_sorted, 1)
        ok = ~bad & ~dup
        done = ok.sum(1) >= n
        first = np.argsort(~ok[done], axis=1, kind="stable")[:, :n]  # first n survivors in draw order
        out[todo[done]] = np.take_along_axis(cand[done], first, 1)
        todo, extra = todo[~done], extra * 2
    return out


def batch_order(lens: np.ndarray, batch_size: int, rng: np.random.Generator, bucket: bool) -> list[np.ndarray]:
    """One epoch of (global) batches of row indices. Bucketing sorts 50-batch windows of a random permutation by
    length, so batches hold similar lengths and trimming removes most padding, then shuffles the batches."""
    perm = rng.permutation(len(lens))
    if bucket:
        w = 50 * batch_size
        perm = np.concatenate([p[np.argsort(lens[p], kind="stable")] for p in np.split(perm, range(w, len(perm), w))])
    batches = np.split(perm, range(batch_size, len(perm), batch_size))
    if bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: run setup (views, artifacts), checkpoints, resuming from DATA/runs/<name>/last.pt
# ----------------------------------------------------------------------------------------------------------------------

def resolve_views(cfg: Config) -> tuple[list[str], Path | None, str]:
    """The views to build, the fused file they come from (None for the plain backbone), and the mode's name."""
    data = Path(cfg.data)
    fused_path = Path(cfg.fused) if cfg.fused else data / "fused.pt"
    mode = cfg.views if cfg.views != "auto" else ("dual" if fused_path.is_file() else "id")
    views = {"id": ["id"], "dual": ["A", "B"], "A": ["A"], "B": ["B"]}.get(mode)
    if views is None:
        raise SystemExit(f"--views {cfg.views!r}: expected auto, id, dual, A or B")
    if cfg.backbone not in ("sasrec", "gru4rec", "bert4rec"):
        raise SystemExit(f"--backbone {cfg.backbone!r}: expected sasrec, gru4rec or bert4rec")
    if cfg.loss not in ("ce", "bce"):
        raise SystemExit(f"--loss {cfg.loss!r}: expected ce or bce")
    if cfg.select not in ("full", "sampled"):
        raise SystemExit(f"--select {cfg.select!r}: expected auto, full or sampled")
    if cfg.train_items not in ("all", "seen"):
        raise SystemExit(f"--train-items {cfg.train_items!r}: expected all or seen")
    if cfg.semantic not in ("fused", "raw", "both") or cfg.id_init not in ("random", "pca"):
        raise SystemExit(f"--semantic {cfg.semantic!r} / --id-init {cfg.id_init!r}: expected fused|raw|both / "
                         "random|pca")
    if cfg.residual_text not in ("view", "tfidf") or cfg.match_text not in ("pooled", "tfidf"):
        raise SystemExit(f"--residual-text {cfg.residual_text!r} / --match-text {cfg.match_text!r}: expected view|tfidf "
                         "/ pooled|tfidf")
    for flag, grid in (("--match-tail", cfg.match_tail), ("--match-query", cfg.match_query)):
        try:
            [float(b) for b in grid.split(",")]
        except ValueError:
            raise SystemExit(f"{flag} {grid!r}: expected comma-separated numbers, e.g. 0,1,2,4")
    free = {v.strip() for v in cfg.id_free.split(",") if v.strip()}
    bad = free - {"A", "B"}
    if bad:
        raise SystemExit(f"--id-free {cfg.id_free!r}: expected a comma-separated subset of A, B")
    if cfg.finetune_fusion and (cfg.semantic != "fused" or cfg.whiten):
        raise SystemExit("--finetune-fusion trains stage 3's module, whose outputs change as it trains: it goes "
                         "with --semantic fused and --no-whiten (whitening is fitted once, on frozen tables)")
    if not 0 <= cfg.id_dropout < 1:
        raise SystemExit(f"--id-dropout {cfg.id_dropout}: expected a probability in [0, 1)")
    if cfg.residual_lags < 1:
        raise SystemExit(f"--residual-lags {cfg.residual_lags}: must be at least 1 (the last item read)")
    if cfg.hidden % cfg.heads:
        raise SystemExit(f"--hidden {cfg.hidden} must be divisible by --heads {cfg.heads}")
    if cfg.id_align and views != ["id"] and (not cfg.id_emb or set(views) <= free):
        raise SystemExit(f"--id-align {cfg.id_align} aligns content with the ID table, but no view of {views} has an "
                         f"ID part (--id-free {cfg.id_free!r}{', --no-id-emb' if not cfg.id_emb else ''})")
    return views, (fused_path if views != ["id"] else None), mode


def load_fused(path: Path, ds: common.Dataset) -> dict:
    fused = common.load_artifact(path, "fused", fingerprint=ds.fingerprint, item_ids=ds.item_ids)
    for k in ("h_A", "h_B"):
        if tuple(fused[k].shape[:1]) != (ds.n_items,):
            raise common.ArtifactError(f"{path}: field '{k}' has shape {tuple(fused[k].shape)}, expected "
                                       f"[{ds.n_items}, d]")
    return fused


def load_semantics(path: Path, ds: common.Dataset) -> dict:
    return common.load_artifact(path, "semantics", fingerprint=ds.fingerprint, item_ids=ds.item_ids)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def save_checkpoint(path, model, cfg, ds, views, best_epoch):
    common.save_artifact(path, "backbone", {"state_dict": model.state_dict(), "views": views,
                                            "n_items": ds.n_items, "item_ids": ds.item_ids,
                                            "best_epoch": best_epoch}, cfg, ds.fingerprint)


RESUME_FREE = ("data", "resume", "threads", "checkpoint_every")  # flags that change nothing a run computes


def rng_state(device) -> dict:
    """The generators a run draws from across epochs (dropout: torch; numpy and Python for code that uses them).
    Batch order, cloze masks and bce negatives need none: each epoch derives its own stream from (seed, epoch)."""
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_resume(path: Path, state: dict, cfg, ds, device, rank: int, world: int) -> None:
    """Rank 0 writes the run's state and every rank's generators (dropout draws differ per rank) atomically: a kill
    mid-write leaves the previous last.pt whole."""
    rngs = [rng_state(device)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state(device))
    if rank == 0:
        common.save_artifact(path, "resume", {**state, "rng": rngs, "world_size": world}, cfg, ds.fingerprint)


def load_resume(path: Path, cfg, ds, world: int) -> dict | None:
    """The checkpoint to resume from (None when there is none yet), refused unless the same run wrote it."""
    if not path.is_file():
        log.warning(f"--resume: no {path} yet; starting from epoch 1")
        return None
    try:
        ck = common.load_artifact(path, "resume", map_location="cpu")
    except Exception as e:  # torch.load of a foreign or truncated file raises many types
        raise SystemExit(f"--resume: {path} cannot be read ({type(e).__name__}: {e}); remove it to start afresh")
    if ck["fingerprint"] != ds.fingerprint:
        raise SystemExit(f"--resume: {path} was written for another dataset (fingerprint {ck['fingerprint']}, "
                         f"{cfg.data} is {ds.fingerprint}); run without --resume or with another --name")
    # a flag added after the checkpoint was written is read there at its default: each new flag's default keeps the
    # behaviour of the code before it, so a run started before the flag existed resumes unchanged
    now, then = asdict(cfg), {**asdict(Config()), **ck["config"]}
    # a larger --epochs extends a run that hit its budget: the epochs already run are those the longer run starts with
    diff = [f"--{k.replace('_', '-')} {then[k]!r} there, {v!r} now" for k, v in now.items()
            if k not in RESUME_FREE and then[k] != v and not (k == "epochs" and v > then[k])]
    if diff:
        raise SystemExit(f"--resume: {path} was written with another config ({'; '.join(diff)}); resume with the "
                         f"same flags, or run without --resume or with another --name")
    if ck["world_size"] != world:
        raise SystemExit(f"--resume: {path} was written by {ck['world_size']} rank(s), this run has {world}; the "
                         f"batches split the same way only with the same number")
    return ck


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: top-k recommendations from a trained run (--recommend RUN), from the command line or a notebook
# ----------------------------------------------------------------------------------------------------------------------

def load_trained(data, run: str, device="auto") -> tuple[Recommender, Config, common.Dataset]:
    """The best-epoch model of DATA/runs/<run>/model.pt (eval mode, on `device`), rebuilt from its stored config with
    the fused views it was trained with, plus that config and the dataset. Refuses a missing model file and a run made
    from another dataset (the checkpoint's fingerprint)."""
    ds = common.load_dataset(data, check_images=False)
    path = Path(data) / "runs" / run / "model.pt"
    if not path.is_file():
        have = sorted(p.parent.name for p in (Path(data) / "runs").glob("*/model.pt"))
        raise common.ArtifactError(f"{path}: not found; train it first (`python 04_train_backbone.py {data} --name "
                                   f"{run}`)" + (f"; runs with a model here: {', '.join(have)}" if have else ""))
    ckpt = common.load_artifact(path, "backbone", fingerprint=ds.fingerprint)
    unknown = sorted(set(ckpt["config"]) - {f.name for f in fields(Config)})
    if unknown:  # a field this code does not know may change the model: refuse rather than rebuild a different one
        raise common.ArtifactError(f"{path}: config field(s) {unknown} are unknown to this version of "
                                   f"04_train_backbone.py; recommend with the version that trained it")
    cfg = Config(**{**ckpt["config"], "data": str(data)})
    fused = sem = None
    if ckpt["views"] != ["id"]:
        srcs = []
        if cfg.semantic != "raw":
            srcs.append(Path(cfg.fused) if cfg.fused else Path(data) / "fused.pt")
            fused = load_fused(srcs[-1], ds)
        if cfg.semantic != "fused":
            srcs.append(Path(cfg.semantics) if cfg.semantics else Path(data) / "semantics.pt")
            sem = load_semantics(srcs[-1], ds)
        for src in srcs:
            if src.stat().st_mtime > path.stat().st_mtime:
                log.warning(f"{src} was rewritten after {path} was saved: the views may differ from training")
    pop = np.bincount(np.concatenate(ds.split()[0]), minlength=ds.n_items + 1)[1:]  # as in training: the ID gate
    model = Recommender(cfg, ds.n_items, ckpt["views"], fused, sem, pop, ds.texts())
    model.load_state_dict(ckpt["state_dict"])
    return model.to(common.pick_device(device)).eval(), cfg, ds


@torch.no_grad()
def top_k(model, cfg: Config, seqs: list[np.ndarray], k: int, keep_seen: bool = False, batch: int = 1024):
    """Item ids [U, k] (1-based; 0 where fewer than k items are left) and scores [U, k], best first, for histories
    `seqs` (internal ids, oldest first). Every item is scored by the evaluation's dot product; a history's own items
    are excluded unless keep_seen. Batched like the evaluation: users sorted by length, so trimming removes padding."""
    device, bert = model.items.mask_vec.device, cfg.backbone == "bert4rec"
    hist, lens = right_aligned(seqs, cfg.max_len - 1 if bert else cfg.max_len)
    vecs = model.all_vectors()
    table = model.table(vecs)
    k = min(k, model.n)
    ids, scores = np.zeros((len(seqs), k), np.int64), np.full((len(seqs), k), -np.inf, np.float32)
    order = np.argsort(lens, kind="stable")
    buf = torch.empty(min(batch, len(seqs)), model.n, device=device)  # one buffer: fresh pages cost more than the mm
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        s = torch.mm(last_states(model, hist[idx], vecs, device, bert), table.T, out=buf[:len(idx)])
        add_at(s, model.near_add(recent(hist[idx], cfg.residual_lags).to(device)))
        if not keep_seen:  # the whole history, not only the max_len items the backbone reads
            seen = [seqs[u] for u in idx]
            rows = torch.from_numpy(np.repeat(np.arange(len(idx)), [len(x) for x in seen])).to(device)
            s[rows, torch.from_numpy(np.concatenate(seen) - 1).to(device)] = float("-inf")
        v, i = s.topk(k, dim=1)
        ids[idx], scores[idx] = i.cpu().numpy() + 1, v.cpu().numpy()
    ids[np.isneginf(scores)] = 0
    return ids, scores


def queries(ds: common.Dataset, users=None, histories=None, where=None) -> tuple[list, list[np.ndarray]]:
    """(labels, internal-id sequences) for user ids (their whole sequence) and histories (lists of item ids); no users
    and no histories = every user. `where[j]` names where user j came from (a file:line) for the unknown-id error."""
    if users is None and histories is None:
        return list(ds.user_ids), list(ds.seqs)
    uindex = {u: n for n, u in enumerate(ds.user_ids)}
    iindex = {s: n + 1 for n, s in enumerate(ds.item_ids)}
    labels, seqs = [], []
    for j, u in enumerate(users or []):
        if str(u) not in uindex:
            raise common.DatasetError(f"{where[j] if where else 'user'}: unknown user id {u!r} (not in "
                                      f"{ds.root}/interactions.csv, {ds.n_users} users)")
        labels.append(str(u))
        seqs.append(ds.seqs[uindex[str(u)]])
    for j, h in enumerate(histories or []):
        bad = [i for i in h if str(i) not in iindex]
        if bad or not h:
            raise common.DatasetError(f"history {j + 1}: " + (f"unknown item id {bad[0]!r} (not in {ds.root}/"
                                      f"items.jsonl)" if bad else "empty (give at least one item id)"))
        labels.append(None)
        seqs.append(np.array([iindex[str(i)] for i in h], dtype=np.int64))
    return labels, seqs


def recommend(data, run: str, users=None, histories=None, k: int = 10, keep_seen: bool = False, device="auto",
              batch: int = 1024) -> list[dict]:
    """Top-k items from DATA/runs/<run>/model.pt, one dict per query: {"user", "items": [{"item_id", "title",
    "score"}, ...]}. `users`: user ids of DATA (history = the whole sequence); `histories`: lists of item ids, oldest
    first ("user" None, "history" echoed); neither: every user. For notebooks:
        stage4 = importlib.import_module("04_train_backbone"); stage4.recommend("data/toy", "sasrec_id", ["user0007"])
    """
    model, cfg, ds = load_trained(data, run, device)
    labels, seqs = queries(ds, users, histories)
    ids, scores = top_k(model, cfg, seqs, k, keep_seen, batch)
    return [format_row(ds, lab, seq, row, sc) for lab, seq, row, sc in zip(labels, seqs, ids, scores)]


def format_row(ds: common.Dataset, label, seq, ids, scores) -> dict:
    out = {"user": label}
    if label is None:
        out["history"] = [ds.item_ids[i - 1] for i in seq]
    out["items"] = [{"item_id": ds.item_ids[i - 1], "title": ds.items[i - 1].get("title", ""), "score": float(s)}
                    for i, s in zip(ids.tolist(), scores.tolist()) if i]
    return out


def recommend_cli(cfg: Config) -> None:
    """--recommend RUN: JSON lines on stdout or to --out (written atomically); bad input is one `error:` line."""
    if cfg.k < 1:
        raise SystemExit(f"error: --k {cfg.k}: must be at least 1")
    try:
        model, run_cfg, ds = load_trained(cfg.data, cfg.recommend, cfg.device)
        users, where = list(cfg.user), ["--user"] * len(cfg.user)
        if cfg.users_file:
            if not Path(cfg.users_file).is_file():
                raise common.DatasetError(f"{cfg.users_file}: file not found (--users-file: one user id per line)")
            for n, line in enumerate(Path(cfg.users_file).read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    users.append(line.strip())
                    where.append(f"{cfg.users_file}:{n}")
        histories = [h.split(",") for h in cfg.history]
        any_given = bool(users or histories)
        labels, seqs = queries(ds, users if any_given else None, histories if any_given else None, where)
    except (common.DatasetError, common.ArtifactError) as e:
        raise SystemExit(f"error: {e}") from None
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    ids, scores = top_k(model, run_cfg, seqs, cfg.k, cfg.keep_seen, cfg.eval_batch)
    dt = time.perf_counter() - t0
    lines = (json.dumps(format_row(ds, *q), ensure_ascii=False) + "\n" for q in zip(labels, seqs, ids, scores))
    if cfg.out:
        common.write_text_atomic(cfg.out, lines)
    else:
        sys.stdout.writelines(lines)
    log.info(f"recommend {cfg.recommend}: top-{cfg.k} of {ds.n_items} items for {len(seqs)} histories in {dt:.2f}s "
             f"({len(seqs) / max(dt, 1e-9):.0f} users/s)" + (f" -> {cfg.out}" if cfg.out else ""))


def main(cfg: Config) -> None:
    common.setup_logging(sys.stderr if cfg.recommend and not cfg.out else None)  # stdout carries the JSON lines
    if cfg.recommend:
        recommend_cli(cfg)
    elif cfg.user or cfg.history or cfg.users_file or cfg.out:
        raise SystemExit("error: --user, --history, --users-file and --out go with --recommend RUN")
    else:
        train(cfg)


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__.split("\n\n")[0], extra_help=HELP))
