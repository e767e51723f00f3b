"""A semantics artifact without an MLLM: every item's only description is its own text (the `txt` view), encoded by
stage 1's text encoder. For screening stage 4's plug-in on real catalogues when stage 1 has not run (it tells how much
the item text alone carries; it is not DMESR's semantics and results from it say so).

    python bench/title_semantics.py DATA --out DATA/semantics_titles.pt

Then: python 04_train_backbone.py DATA --views A,B --semantic raw --semantics DATA/semantics_titles.pt ...
"""
import importlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402

stage1 = importlib.import_module("01_generate_semantics")


@dataclass
class Config(stage1.Config):
    pass


def main(cfg) -> Path:
    common.setup_logging()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    ds = common.load_dataset(cfg.data, check_images=False)
    rows = list(range(ds.n_items))
    originals = ds.texts()
    texts = {"img": [None] * len(rows), "txt": list(originals), "mm": [None] * len(rows)}
    emb = stage1.encode_views(cfg, common.pick_device(cfg.device), texts, originals)
    out = Path(cfg.out) if cfg.out else Path(cfg.data) / "semantics_titles.pt"
    config = {**asdict(cfg), "backend": "none: the item's own text is its only description (no MLLM)",
              "views": stage1.VIEWS, "encoder_path": stage1.encoder_path(cfg.encoder)}
    common.save_artifact(out, "semantics", {
        "item_ids": list(ds.item_ids), "views": list(stage1.VIEWS), "texts": texts,
        "view_emb": emb["view_emb"].to(torch.float16), "view_mask": emb["view_mask"],
        "text_tokens": emb["text_tokens"], "text_mask": emb["text_mask"],
        "text_pooled": emb["text_pooled"].to(torch.float16), "tags": {}}, config, ds.fingerprint)
    print(f"wrote {out}: {len(rows)} items")
    return out


if __name__ == "__main__":
    main(common.parse_config(Config, description=__doc__.split("\n\n")[0]))
