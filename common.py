"""The small module the four DMESR stages share: dataset I/O, artifact I/O, config flags, seeding, logging.

Only what two or more stages really use lives here; everything about the method lives in the stage files.
"""
from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import random
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1  # bump when the layout of a stage artifact changes; loaders refuse other versions

log = logging.getLogger("dmesr")


def setup_logging(stream=None) -> None:
    """One-line log records on `stream` (default stdout; stderr when stdout carries a command's output)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S",
                        stream=stream or sys.stdout)


# ----------------------------------------------------------------------------------------------------------------------
# Config: a dataclass whose fields carry a one-line docstring; each field becomes a --flag (cleanrl style).
# ----------------------------------------------------------------------------------------------------------------------

def _field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal right under a field) read from the class source."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr) \
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = nxt.value.value.strip()
    return docs


def parse_config(cls, argv: list[str] | None = None, description: str | None = None):
    """Build `cls` from the command line: the dataset directory is positional, every field is `--field-name`."""
    docs = _field_docs(cls)
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cls):
        help_ = docs.get(f.name, "")
        if f.name == "data":  # positional, so it needs no default (`data: str` with none is the documented form)
            p.add_argument("data", help=help_)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        typ = f.type if not isinstance(f.type, str) else eval(f.type, vars(sys.modules[cls.__module__]))  # noqa: S307
        if typ is bool:
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, help=help_,
                           action=argparse.BooleanOptionalAction)
        elif typ in (int, float, str):
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, type=typ, help=help_)
        elif typing.get_origin(typ) is list:  # list[str]: `--flag A B C`, each value one element
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, nargs="+",
                           type=typing.get_args(typ)[0], help=help_)
        else:  # Optional[...] / list types: take the text, let the stage interpret it
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default, help=help_)
    return cls(**vars(p.parse_args(argv)))


def log_config(cfg) -> None:
    """One table of every hyperparameter at the start of a run."""
    d = dataclasses.asdict(cfg)
    w = max(map(len, d))
    log.info("config:\n" + "\n".join(f"  {k:<{w}}  {v}" for k, v in d.items()))


# ----------------------------------------------------------------------------------------------------------------------
# Seeding and device
# ----------------------------------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------------------
# Dataset directory: interactions.csv + items.jsonl (+ images/)
# ----------------------------------------------------------------------------------------------------------------------

class DatasetError(ValueError):
    """Bad input, with the file, line and field that caused it."""


def item_text(meta: dict) -> str:
    """The item's original text t_i: title + brand + categories + price + description, in that order."""
    parts = []
    if meta.get("title"):
        parts.append(str(meta["title"]).strip())
    if meta.get("brand"):
        parts.append(f"Brand: {meta['brand']}")
    cats = meta.get("categories")
    if cats:
        parts.append("Categories: " + (", ".join(map(str, cats)) if isinstance(cats, list) else str(cats)))
    if meta.get("price") not in (None, ""):
        parts.append(f"Price: {meta['price']}")
    if meta.get("description"):
        parts.append(str(meta["description"]).strip())
    return ". ".join(p.rstrip(".") for p in parts if p)


@dataclass
class Dataset:
    root: Path
    item_ids: list[str]          # internal id i (1..n_items) <-> item_ids[i - 1]; 0 is padding
    items: list[dict]            # items.jsonl object of internal id i at items[i - 1]
    user_ids: list[str]
    seqs: list[np.ndarray]       # per user, chronological internal item ids (int64)
    images: list[Path | None]    # usable image path per item, None when absent/missing/unreadable
    report: dict = field(default_factory=dict)
    fingerprint: str = ""

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def texts(self) -> list[str]:
        return [item_text(m) for m in self.items]

    def split(self):
        """Leave-one-out: train = seq[:-2], validation target = seq[-2], test target = seq[-1].

        Users with fewer than 3 interactions keep everything in train and get no validation/test case.
        Returns (train_seqs, eval_users): user u's validation input is train_seqs[u] with target seqs[u][-2]; the
        test input is seqs[u][:-1] with target seqs[u][-1].
        """
        train = [s[:-2] if len(s) >= 3 else s for s in self.seqs]
        eval_users = np.flatnonzero(np.array([len(s) >= 3 for s in self.seqs]))
        return train, eval_users


def _open_image_ok(path: Path) -> str | None:
    """None when the image opens and decodes its header, else the reason."""
    from PIL import Image
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as e:  # PIL raises many types for corrupt files; we only need "unusable" + why
        return f"unreadable ({type(e).__name__})"


def load_dataset(root: str | Path, check_images: bool = True) -> Dataset:
    """Load a canonical dataset directory into id maps, chronological sequences and image paths.

    Raises DatasetError naming file, line and field for malformed rows, duplicate item ids and unknown item ids.
    Missing or unreadable images are counted and reported (the item keeps its text); items without text are counted.
    """
    root = Path(root)
    items_path, inter_path = root / "items.jsonl", root / "interactions.csv"
    for p in (items_path, inter_path):
        if not p.is_file():
            raise DatasetError(f"{p}: file not found (a dataset directory needs items.jsonl and interactions.csv; "
                               f"build one with `python data/prepare.py ...`)")

    # --- items.jsonl ---
    item_ids: list[str] = []
    items: list[dict] = []
    index: dict[str, int] = {}
    with open(items_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{items_path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DatasetError(f"{items_path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            if obj.get("item_id") in (None, ""):
                raise DatasetError(f"{items_path}:{lineno}: field 'item_id' is missing or empty")
            iid = str(obj["item_id"])
            if iid in index:
                raise DatasetError(f"{items_path}:{lineno}: field 'item_id': duplicate item id {iid!r} "
                                   f"(first defined on line {items[index[iid] - 1]['_line']})")
            obj["_line"] = lineno
            index[iid] = len(item_ids) + 1
            item_ids.append(iid)
            items.append(obj)

    # --- interactions.csv ---
    users: dict[str, int] = {}
    u_col, i_col, t_col = [], [], []
    unknown, first_unknown = 0, None
    with open(inter_path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["user_id", "item_id", "timestamp"]:
            raise DatasetError(f"{inter_path}:1: header must be 'user_id,item_id,timestamp', got {header!r}")
        for row in reader:
            lineno = reader.line_num
            if not row:
                continue
            if len(row) != len(header):
                raise DatasetError(f"{inter_path}:{lineno}: expected {len(header)} fields "
                                   f"(user_id,item_id,timestamp), got {len(row)}: {row!r}")
            uid, iid, ts = row[0], row[1], row[2]
            if uid == "":
                raise DatasetError(f"{inter_path}:{lineno}: field 'user_id' is empty")
            try:
                t = float(ts)
            except ValueError:
                try:
                    t = datetime.fromisoformat(ts).timestamp()
                except ValueError:
                    raise DatasetError(f"{inter_path}:{lineno}: field 'timestamp': {ts!r} is neither a number "
                                       f"nor an ISO date") from None
            if not np.isfinite(t):  # float() accepts 'nan' and 'inf', which would scramble the chronological order
                raise DatasetError(f"{inter_path}:{lineno}: field 'timestamp': {ts!r} is not a finite number")
            j = index.get(iid)
            if j is None:
                unknown += 1
                first_unknown = first_unknown or (lineno, iid)
                continue
            u_col.append(users.setdefault(uid, len(users)))
            i_col.append(j)
            t_col.append(t)
    if unknown:
        ln, iid = first_unknown
        raise DatasetError(f"{inter_path}:{ln}: field 'item_id': unknown item id {iid!r} (not in items.jsonl); "
                           f"{unknown} row(s) in all reference unknown items")
    if not u_col:
        raise DatasetError(f"{inter_path}: no interactions")

    u = np.asarray(u_col, dtype=np.int64)
    it = np.asarray(i_col, dtype=np.int64)
    t = np.asarray(t_col, dtype=np.float64)
    # chronological per user; ties keep file order (lexsort is stable and the last key is the primary one)
    order = np.lexsort((np.arange(len(u)), t, u))
    u, it = u[order], it[order]
    bounds = np.flatnonzero(np.diff(u)) + 1
    seqs = np.split(it, bounds)

    # --- images and text ---
    images: list[Path | None] = []
    img_problems: dict[str, int] = {}
    first_img_problem = None
    for meta in items:
        rel = meta.get("image")
        if not rel:
            images.append(None)
            continue
        p = root / rel
        why = _open_image_ok(p) if check_images else (None if p.is_file() else "missing")
        if why is None:
            images.append(p)
        else:
            images.append(None)
            kind = why.split(" ")[0]
            img_problems[kind] = img_problems.get(kind, 0) + 1
            first_img_problem = first_img_problem or f"{items_path}:{meta['_line']}: field 'image': {rel!r} {why}"
    no_text = sum(1 for m in items if not item_text(m))

    report = {
        "users": len(users), "items": len(item_ids), "interactions": int(len(u)),
        "items_with_image": sum(p is not None for p in images),
        "images_missing": img_problems.get("missing", 0), "images_unreadable": img_problems.get("unreadable", 0),
        "items_without_text": no_text,
        "items_without_interactions": int(len(item_ids) - len(np.unique(it))),
    }
    if img_problems:
        log.warning(f"{sum(img_problems.values())} item image(s) unusable ({img_problems}); those items keep their "
                    f"text and get no image view. First: {first_img_problem}")
    h = hashlib.sha256()
    h.update("\n".join(item_ids).encode())
    h.update(np.asarray([len(s) for s in seqs], dtype=np.int64).tobytes())
    h.update(it.tobytes())
    return Dataset(root=root, item_ids=item_ids, items=items, user_ids=list(users), seqs=seqs, images=images,
                   report=report, fingerprint=h.hexdigest()[:16])


# ----------------------------------------------------------------------------------------------------------------------
# Stage artifacts (.pt): atomic write, format version, producing config, dataset fingerprint
# ----------------------------------------------------------------------------------------------------------------------

class ArtifactError(RuntimeError):
    """An artifact that is missing, from another format version, another stage or another dataset."""


def save_artifact(path: str | Path, kind: str, payload: dict, config: Any, fingerprint: str) -> Path:
    """Write `payload` + metadata to `path` atomically: a crash mid-write leaves any previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    obj = {"format_version": FORMAT_VERSION, "kind": kind, "config": cfg, "fingerprint": fingerprint, **payload}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text_atomic(path: str | Path, chunks) -> Path:
    """Write text chunks to a temp file beside `path` and rename it over `path`, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for c in chunks:
                f.write(c)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_artifact(path: str | Path, kind: str, fingerprint: str | None = None, map_location="cpu") -> dict:
    """Load a stage artifact and refuse it, with a message saying what to rerun, if it does not fit."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: not found; run the stage that writes the {kind} artifact first")
    obj = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        raise ArtifactError(f"{path}: expected a '{kind}' artifact, found {obj.get('kind') if isinstance(obj, dict) else type(obj)}")
    if obj.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {obj.get('format_version')} but this code reads "
                            f"{FORMAT_VERSION}; rerun the stage that made it")
    if fingerprint is not None and obj.get("fingerprint") != fingerprint:
        raise ArtifactError(f"{path}: made from another dataset (fingerprint {obj.get('fingerprint')}, this dataset "
                            f"is {fingerprint}); rerun the stage that made it on this dataset directory")
    return obj
