"""Stage 2 of DMESR: contrastive alignment of the MLLM's cross-modal semantics.

Three-way prompting (stage 1) gives every item up to three descriptions: D_img (image only), D_txt (text only) and
D_mm (image + text), each embedded by a frozen text encoder. They describe the same item from different modalities but
live wherever the encoder put them. Here one projection head per view maps them into a shared d-dim space, trained
with a symmetric InfoNCE loss (in-batch negatives, temperature tau) on the pairs (img, txt), (img, mm), (txt, mm) of
every item that has both views: views of the same item are pulled together, views of other items pushed apart.
The aligned views are the item's *coarse* MLLM semantics that stage 3 fuses with the fine-grained text tokens.

    python 02_align.py DATA [--d 64 --tau 0.07 --epochs 100 --lr 1e-3 --batch 256]

Reads DATA/semantics.pt (stage 1). Writes DATA/aligned.pt: aligned [N, 3, d] (L2-normalised, zeros where a view is
absent), view_mask [N, 3], the heads' state_dict and this config. Alignment reads item content only (no interactions).
When no item has two views (e.g. Amazon Beauty: no images, so only D_txt exists) no pair loss is possible: the script
says so and writes the heads at their (orthogonal) initialisation, a distance-preserving projection of the one view.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
from common import log


@dataclass
class Config:
    data: str
    """dataset directory (reads semantics.pt there, writes aligned.pt there)"""
    semantics: str = ""
    """stage-1 artifact to read (default: DATA/semantics.pt)"""
    out: str = ""
    """where to write the aligned views (default: DATA/aligned.pt)"""
    d: int = 64
    """dimension of the shared aligned space"""
    tau: float = 0.07
    """InfoNCE temperature"""
    epochs: int = 100
    """passes over the items that have at least two views"""
    batch: int = 256
    """items per batch; the other items of the batch are the negatives"""
    lr: float = 1e-3
    """AdamW learning rate"""
    weight_decay: float = 1e-4
    """AdamW weight decay"""
    log_every: int = 10
    """log the loss every this many epochs"""
    seed: int = 42
    """random seed (head init, batch order)"""
    device: str = "auto"
    """cpu, cuda, cuda:1 or auto"""
    threads: int = 0
    """torch CPU threads (0 = torch's default; 1 is much faster when other jobs share the cores)"""


VIEWS = ["img", "txt", "mm"]
PAIRS = [(0, 1), (0, 2), (1, 2)]  # (img, txt), (img, mm), (txt, mm)


# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: projection heads and the masked symmetric InfoNCE
# ----------------------------------------------------------------------------------------------------------------------

class AlignHeads(nn.Module):
    """One linear projection per MLLM view into the shared space (CLIP-style heads), output L2-normalised."""

    def __init__(self, e: int, d: int, n_views: int = 3):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(e, d, bias=False) for _ in range(n_views))
        for h in self.heads:
            # orthogonal rows: before (or without) training the head is a distance-preserving projection
            nn.init.orthogonal_(h.weight)

    def forward(self, view_emb: torch.Tensor, view_mask: torch.Tensor) -> torch.Tensor:
        """view_emb [B, V, E], view_mask [B, V] -> [B, V, d], unit vectors where the view exists, zeros elsewhere."""
        z = torch.stack([h(view_emb[:, v]) for v, h in enumerate(self.heads)], dim=1)
        return F.normalize(z, dim=-1) * view_mask.unsqueeze(-1)


def pair_infonce(z: torch.Tensor, mask: torch.Tensor, tau: float) -> tuple[torch.Tensor, int]:
    """Symmetric InfoNCE summed over the view pairs; per pair only items that have both views take part.

    Returns (mean loss over the pairs that had >= 2 such items, number of those pairs). A pair with a single item has
    no negative, so its loss is a constant and is skipped.
    """
    losses = []
    for a, b in PAIRS:
        both = mask[:, a] & mask[:, b]
        if int(both.sum()) < 2:
            continue
        za, zb = z[both, a], z[both, b]
        logits = za @ zb.T / tau  # row k's positive is column k: the same item's other view
        target = torch.arange(len(za), device=z.device)
        losses.append(0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)))
    if not losses:
        return z.sum() * 0.0, 0
    return torch.stack(losses).mean(), len(losses)


@torch.no_grad()
def cross_view_retrieval(z: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Top-1 accuracy of finding an item's other view among all items' views of that kind (chance = 1 / #items)."""
    out = {}
    for a, b in PAIRS:
        both = mask[:, a] & mask[:, b]
        if int(both.sum()) < 2:
            continue
        za, zb = z[both, a], z[both, b]
        hit = (za @ zb.T).argmax(1) == torch.arange(len(za), device=z.device)
        out[f"{VIEWS[a]}-{VIEWS[b]}"] = hit.float().mean().item()
    return out


def align(view_emb: torch.Tensor, view_mask: torch.Tensor, cfg: Config, device: torch.device):
    """Train the heads; returns (heads, aligned [N, V, d] on CPU, loss curve as [(epoch, loss)])."""
    n, v, e = view_emb.shape
    heads = AlignHeads(e, cfg.d, v).to(device)
    x, m = view_emb.to(device, torch.float32), view_mask.to(device)
    trainable = torch.nonzero(m.sum(1) >= 2).squeeze(1)  # only items with >= 2 views carry a pair loss
    curve: list[tuple[int, float]] = []
    if len(trainable) < 2:
        present = {VIEWS[k]: int(view_mask[:, k].sum()) for k in range(v)}
        log.warning(f"alignment: {len(trainable)} item(s) have two or more MLLM views (views present: {present}), "
                    f"so no contrastive pair loss is possible; aligned.pt holds the orthogonal projection of the "
                    f"available view(s), untrained")
    else:
        opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        g = torch.Generator().manual_seed(cfg.seed)
        t0, seen = time.time(), 0
        for epoch in range(1, cfg.epochs + 1):
            order = trainable[torch.randperm(len(trainable), generator=g).to(device)]
            total, steps = 0.0, 0
            for s in range(0, len(order), cfg.batch):
                idx = order[s:s + cfg.batch]
                if len(idx) < 2:
                    continue
                loss, n_pairs = pair_infonce(heads(x[idx], m[idx]), m[idx], cfg.tau)
                if n_pairs == 0:
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                steps += 1
                seen += len(idx)
            curve.append((epoch, total / max(steps, 1)))
            if epoch == 1 or epoch % cfg.log_every == 0 or epoch == cfg.epochs:
                log.info(f"epoch {epoch:4d}  loss {curve[-1][1]:.4f}  {seen / (time.time() - t0):,.0f} items/s")
    heads.eval()
    with torch.no_grad():
        aligned = torch.cat([heads(x[s:s + 4096], m[s:s + 4096]) for s in range(0, n, 4096)]).cpu()
    return heads, aligned, curve


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: load semantics.pt, run, write aligned.pt
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
    sem = common.load_artifact(cfg.semantics or data / "semantics.pt", "semantics", fingerprint=ds.fingerprint,
                               item_ids=ds.item_ids)
    view_emb, view_mask = sem["view_emb"].float(), sem["view_mask"].bool()
    if view_emb.shape[0] != ds.n_items or view_emb.dim() != 3:
        raise common.ArtifactError(f"{cfg.semantics or data / 'semantics.pt'}: view_emb has shape "
                                   f"{tuple(view_emb.shape)}, expected [{ds.n_items}, 3, E]")
    counts = {VIEWS[k]: int(view_mask[:, k].sum()) for k in range(view_mask.shape[1])}
    log.info(f"{ds.n_items} items, views present: {counts}, items with >= 2 views: {int((view_mask.sum(1) >= 2).sum())}"
             f", with none: {int((view_mask.sum(1) == 0).sum())}")

    heads, aligned, curve = align(view_emb, view_mask, cfg, device)
    retrieval = cross_view_retrieval(aligned, view_mask)
    before = cross_view_retrieval(F.normalize(view_emb, dim=-1) * view_mask.unsqueeze(-1), view_mask)
    if retrieval:
        log.info("cross-view top-1 retrieval among all items, raw encoder space -> aligned: "
                 + ", ".join(f"{k} {before[k]:.3f} -> {retrieval[k]:.3f}" for k in retrieval)
                 + f" (chance {1 / max(ds.n_items, 1):.4f})")
    out = Path(cfg.out or data / "aligned.pt")
    common.save_artifact(out, "aligned", {
        "item_ids": list(sem["item_ids"]), "aligned": aligned.float(), "view_mask": view_mask,
        "heads": {k: t.cpu() for k, t in heads.state_dict().items()},
        "loss_curve": curve, "retrieval": retrieval, "pair_loss": bool(curve),
    }, cfg, ds.fingerprint)
    log.info(f"wrote {out}: aligned {tuple(aligned.shape)}")


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__.split("\n\n")[0]))
