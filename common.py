"""The small module the four DMESR stages share: dataset I/O, artifact I/O, config flags, seeding, logging.

Only what two or more stages really use lives here; everything about the method lives in the stage files.
"""
from __future__ import annotations

import argparse
import ast
import codecs
import csv
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import random
import re
import sys
import textwrap
import typing
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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


def parse_config(cls, argv: list[str] | None = None, description: str | None = None,
                 extra_help: dict[str, str] | None = None):
    """Build `cls` from the command line: the dataset directory is positional, every field is `--field-name`.
    `extra_help` appends text known only at run time (e.g. the per-backbone values behind a -1 default) to a help."""
    docs = _field_docs(cls)
    for name, extra in (extra_help or {}).items():
        docs[name] = f"{docs.get(name, '')} {extra}".strip()
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
# Seeding, device, attention, InfoNCE
# ----------------------------------------------------------------------------------------------------------------------

def seed_everything(seed: int, device: torch.device | str = "cpu") -> None:
    """Seeds every generator; on CPU also makes torch pick its deterministic kernels, so a rerun repeats bit for bit
    at any thread count. Without that, the backward of `table[ids]` with repeated ids adds rows with atomics across
    threads, the order of those float sums varies from run to run, and the drift grows through training into different
    test figures. CUDA keeps its fast kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if torch.device(device).type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)  # warn, never fail, on an op with no such kernel


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def attend(q, k, v, mask, dropout: float = 0.0, impl: str = "sdpa"):
    """softmax(q k^T / sqrt(d), masked) v for q [B, H, Lq, dh], k, v [B, H, Lk, dh]; `mask` broadcasts to
    [B, H, Lq, Lk], True = may attend, and leaves every query at least one key (else its softmax is NaN).
    'sdpa' is the fast path (torch's scaled_dot_product_attention); 'plain' is the same maths spelled out, the
    definition the fast path is tested against. Stage 3 (cross-attention) and stage 4 (self-attention) share it."""
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    s = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    a = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    return F.dropout(a, dropout, training=dropout > 0) @ v


def info_nce(query, key, tau: float, key_ids=None):
    """InfoNCE with in-batch negatives: row k's positive is key k. Columns holding the same item as the positive (a
    popular next item appears several times in a batch; pass its ids as key_ids) are not counted as negatives."""
    logits = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).T / tau
    target = torch.arange(len(query), device=query.device)
    if key_ids is not None:
        dup = (key_ids[:, None] == key_ids[None, :]) & ~torch.eye(len(key_ids), dtype=torch.bool, device=query.device)
        logits = logits.masked_fill(dup, float("-inf"))
    return F.cross_entropy(logits, target)


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
    try:
        if not path.is_file():
            return "missing"
    except OSError as e:  # e.g. a name too long for the file system: no such image either
        return f"missing ({e.strerror})"
    try:
        with Image.open(path) as im:
            im.verify()
        return None
    except Exception as e:  # PIL raises many types for corrupt files; we only need "unusable" + why
        return f"unreadable ({type(e).__name__})"


# A timestamp is an ASCII integer, an ASCII decimal or an ISO date. float() alone would also take '1_000', '١٢٣' and
# 'nan', and would tie distinct integers above 2**53 (nanosecond clocks), silently reordering a user's items.
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_INT = re.compile(r"[+-]?[0-9]+")
_DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
# items.jsonl fields the stages read, and the JSON types each may take (null = absent; bool is never a number here)
_SURROGATE_SOURCE = re.compile(rb"\\u[dD][89a-fA-F]")
ITEM_FIELD_TYPES = {"item_id": (str, int), "title": (str,), "brand": (str,), "description": (str,),
                    "categories": (str, list), "price": (str, int, float), "image": (str,)}


def _show(value, n: int = 80) -> str:
    """repr of a value for an error message, cut so that a megabyte-long field does not become the message."""
    r = repr(value)
    return r if len(r) <= n else r[:n] + f"... ({len(r)} characters in all)"


def _timestamp(ts: str) -> tuple[str, float, int]:
    """Kind ('number' or 'date') and sort key (value, exact integer remainder) of a timestamp field; ValueError saying
    why it is not one. Integers and dates (in microseconds) order exactly; decimals at double precision."""
    s = ts.strip()
    if _INT.fullmatch(s):
        v = int(s) if len(s) < 25 else 2 ** 63  # (int() refuses thousands of digits with its own error)
        if abs(v) >= 2 ** 63:
            raise ValueError("is out of range (a timestamp must be below 2**63 in magnitude)")
        hi = float(v)
        return "number", hi, v - int(hi)  # float rounding is monotone, so (hi, remainder) orders integers exactly
    if _DECIMAL.fullmatch(s):
        v = float(s)
        if not math.isfinite(v):
            raise ValueError("is not a finite number")
        return "number", v, 0
    try:
        d = datetime.fromisoformat(s)
    except ValueError:
        try:
            finite = math.isfinite(float(s))
        except ValueError:
            finite = True
        raise ValueError("is neither a number nor an ISO date" if finite else "is not a finite number") from None
    # a date without a time zone is read as UTC: local time would tie or invert the times around a DST change
    us = ((d if d.tzinfo else d.replace(tzinfo=timezone.utc)) - _EPOCH) // timedelta(microseconds=1)
    hi = float(us)
    return "date", hi, us - int(hi)


def _undecodable(s: str) -> int:
    """Index of the first character that is no Unicode text, or -1: a byte that was not valid UTF-8 (which
    'surrogateescape' keeps as a lone surrogate) or a lone surrogate written as a JSON escape."""
    try:
        s.encode("utf-8")
        return -1
    except UnicodeEncodeError as e:
        return e.start


def _bad_field(obj, name: str = "") -> str | None:
    """The name of the first field of a parsed JSON value that holds bytes that were not valid UTF-8."""
    if isinstance(obj, str):
        return name if _undecodable(obj) >= 0 else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        if isinstance(k, str) and _undecodable(k) >= 0:
            return str(k)
        bad = _bad_field(v, name or str(k))
        if bad is not None:
            return bad
    return None


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs):
    """json object hook: a repeated key would silently keep only its last value."""
    obj = {}
    for k, v in pairs:
        if k in obj:
            raise _DuplicateKey(k)
        obj[k] = v
    return obj


def _parse_item(line: bytes, where: str) -> dict:
    """One items.jsonl line -> its object, or DatasetError naming the field at fault."""
    text = line.decode("utf-8", errors="surrogateescape")
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
        # only a line with undecodable bytes or a \uDxxx escape can hold a lone surrogate: skip the walk otherwise
        bad = _bad_field(obj) if _SURROGATE_SOURCE.search(line) or _undecodable(text) >= 0 else None
    except _DuplicateKey as e:
        raise DatasetError(f"{where}: field {_show(e.args[0])}: appears twice in the object") from None
    except json.JSONDecodeError as e:
        bad = _undecodable(text)
        if bad >= 0:
            raise DatasetError(f"{where}: not valid UTF-8 (byte 0x{ord(text[bad]) - 0xdc00:02x} at column "
                               f"{bad + 1})") from None
        raise DatasetError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits; nesting deeper than Python's stack
        raise DatasetError(f"{where}: not valid JSON here ({type(e).__name__}: {str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if bad is not None:
        raise DatasetError(f"{where}: field {_show(bad)}: not valid UTF-8 text (an undecodable byte or a lone "
                           f"surrogate)")
    for k, types in ITEM_FIELD_TYPES.items():
        v = obj.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, types) or isinstance(v, float) and not math.isfinite(v) \
                or isinstance(v, list) and not all(isinstance(x, str) for x in v):
            want = " or ".join({"str": "a string", "int": "an integer", "float": "a number",
                                "list": "a list of strings"}[t.__name__] for t in types)
            raise DatasetError(f"{where}: field {k!r}: expected {want} (or null), got {_show(v)}")
    iid = obj.get("item_id")
    if iid in (None, ""):
        raise DatasetError(f"{where}: field 'item_id' is missing or empty")
    if isinstance(iid, str) and iid != iid.strip():
        raise DatasetError(f"{where}: field 'item_id': {_show(iid)} has leading or trailing whitespace")
    return obj


def load_dataset(root: str | Path, check_images: bool = True) -> Dataset:
    """Load a canonical dataset directory into id maps, chronological sequences and image paths.

    Every damaged input ends in one DatasetError naming file, line and field (the README lists the damage covered):
    undecodable UTF-8, malformed rows or JSON, wrong field types, bad timestamps, duplicate or unknown item ids, ids
    with surrounding whitespace, an image path that leaves the dataset directory. A BOM and CRLF line ends are read as
    what they are. Missing or unreadable images are counted and reported (the item keeps its text); items without
    text are counted. Ids are case-sensitive: 'A' and 'a' are two items.
    """
    root = Path(root)
    items_path, inter_path = root / "items.jsonl", root / "interactions.csv"
    for p in (items_path, inter_path):
        if not p.is_file():
            raise DatasetError(f"{p}: file not found (a dataset directory needs items.jsonl and interactions.csv; "
                               f"build one with `python data/prepare.py ...`)")

    # --- items.jsonl: split at b"\n" only (U+2028 inside a JSON string is no line end) ---
    item_ids: list[str] = []
    items: list[dict] = []
    item_lines: list[int] = []
    index: dict[str, int] = {}
    with open(items_path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if not line.strip():
                continue
            obj = _parse_item(line, f"{items_path}:{lineno}")
            iid = str(obj["item_id"])
            if iid in index:
                raise DatasetError(f"{items_path}:{lineno}: field 'item_id': duplicate item id {_show(iid)} "
                                   f"(first defined on line {item_lines[index[iid] - 1]})")
            index[iid] = len(item_ids) + 1
            item_ids.append(iid)
            items.append(obj)
            item_lines.append(lineno)
    if not items:
        raise DatasetError(f"{items_path}:1: no items (the file is empty)")

    # --- interactions.csv ---
    users: dict[str, int] = {}
    u_col, i_col, t_col, t_rem = [], [], [], []
    unknown, first_unknown = 0, None
    first_kind = None  # (kind, line) of the first timestamp: numbers and dates do not mix (no common unit)
    # strict: an unclosed quote or text after a closing quote is an error, not a field silently glued to the next rows
    with open(inter_path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f, strict=True)
        rows = iter(reader)
        lineno = 1
        try:
            header = next(rows, None)
            if header is None or [h.strip() for h in header[:3]] != ["user_id", "item_id", "timestamp"]:
                raise DatasetError(f"{inter_path}:1: header must be 'user_id,item_id,timestamp', got "
                                   f"{'an empty file' if header is None else _show(','.join(header))}")
            names = [h.strip() for h in header]
            while True:
                lineno = reader.line_num + 1  # where the row starts (a quoted field may span lines)
                row = next(rows, None)
                if row is None:
                    break
                if not row:
                    continue
                if len(row) != len(header):
                    what = (f"field {names[len(row)]!r} is missing" if len(row) < len(header)
                            else f"extra field after {names[-1]!r}")
                    raise DatasetError(f"{inter_path}:{lineno}: {what}: expected {len(header)} fields "
                                       f"({','.join(names)}), got {len(row)}: {_show(row, 200)}")
                for name, v in zip(names, row):
                    if not v.isascii() and _undecodable(v) >= 0:
                        raise DatasetError(f"{inter_path}:{lineno}: field {name!r}: not valid UTF-8: {_show(v)}")
                uid, iid, ts = row[0], row[1], row[2]
                if uid == "":
                    raise DatasetError(f"{inter_path}:{lineno}: field 'user_id' is empty")
                if uid != uid.strip():
                    raise DatasetError(f"{inter_path}:{lineno}: field 'user_id': {_show(uid)} has leading or "
                                       f"trailing whitespace")
                try:
                    kind, t, rem = _timestamp(ts)
                except ValueError as e:
                    raise DatasetError(f"{inter_path}:{lineno}: field 'timestamp': {_show(ts)} {e}") from None
                first_kind = first_kind or (kind, lineno)
                if kind != first_kind[0]:
                    raise DatasetError(f"{inter_path}:{lineno}: field 'timestamp': {_show(ts)} is a {kind} but line "
                                       f"{first_kind[1]} holds a {first_kind[0]}; one file takes one kind")
                j = index.get(iid)
                if j is None:
                    unknown += 1
                    first_unknown = first_unknown or (lineno, iid)
                    continue
                u_col.append(users.setdefault(uid, len(users)))
                i_col.append(j)
                t_col.append(t)
                t_rem.append(rem)
        except csv.Error as e:
            raise DatasetError(f"{inter_path}:{lineno}: not valid CSV in the row that starts here ({e})") from None
    if unknown:
        ln, iid = first_unknown
        hint = " (it has leading or trailing whitespace)" if iid != iid.strip() else ""
        raise DatasetError(f"{inter_path}:{ln}: field 'item_id': unknown item id {_show(iid)}{hint} (not in "
                           f"items.jsonl); {unknown} row(s) in all reference unknown items")
    if not u_col:
        raise DatasetError(f"{inter_path}:2: no interactions (the file has a header only)")

    u = np.asarray(u_col, dtype=np.int64)
    it = np.asarray(i_col, dtype=np.int64)
    t = np.asarray(t_col, dtype=np.float64)
    # chronological per user; ties keep file order (lexsort is stable and the last key is the primary one)
    order = np.lexsort((np.arange(len(u)), np.asarray(t_rem, dtype=np.int64), t, u))
    u, it = u[order], it[order]
    bounds = np.flatnonzero(np.diff(u)) + 1
    seqs = np.split(it, bounds)

    # --- images and text ---
    images: list[Path | None] = []
    img_problems: dict[str, int] = {}
    first_img_problem = None
    inside = root.resolve()
    for meta, lineno in zip(items, item_lines):
        rel = meta.get("image")
        if not rel:
            images.append(None)
            continue
        p = root / rel
        # an image is read and, with an endpoint MLLM, sent over the network: a path out of the directory (absolute,
        # '..', or a symlink) would hand out any file the user can read
        try:
            real = p.resolve()
        except (OSError, RuntimeError, ValueError) as e:  # NUL in the name, a symlink loop
            raise DatasetError(f"{items_path}:{lineno}: field 'image': {_show(rel)} is not a usable path "
                               f"({e})") from None
        if not real.is_relative_to(inside):
            raise DatasetError(f"{items_path}:{lineno}: field 'image': {_show(rel)} leads outside the dataset "
                               f"directory (to {real}); copy the image into {root}")
        if check_images:
            why = _open_image_ok(p)
        else:
            try:
                why = None if p.is_file() else "missing"
            except OSError as e:
                why = f"missing ({e.strerror})"
        if why is None:
            images.append(p)
        else:
            images.append(None)
            kind = why.split(" ")[0]
            img_problems[kind] = img_problems.get(kind, 0) + 1
            first_img_problem = first_img_problem or f"{items_path}:{lineno}: field 'image': {_show(rel)} {why}"
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
        with open(tmp, "w", encoding="utf-8", newline="") as f:  # "\n" stays "\n" on every platform (CSV rows)
            for c in chunks:
                f.write(c)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_artifact(path: str | Path, kind: str, fingerprint: str | None = None, map_location="cpu",
                  item_ids: list[str] | None = None) -> dict:
    """Load a stage artifact and refuse it, with a message saying what to rerun, if it does not fit: another kind,
    format version or dataset fingerprint, or (given `item_ids`, the dataset's) rows for other items."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: not found; run the stage that writes the {kind} artifact first")
    obj = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(obj, dict) or obj.get("kind") != kind:
        found = obj.get("kind") if isinstance(obj, dict) else type(obj)
        raise ArtifactError(f"{path}: expected a '{kind}' artifact, found {found}")
    if obj.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {obj.get('format_version')} but this code reads "
                            f"{FORMAT_VERSION}; rerun the stage that made it")
    if fingerprint is not None and obj.get("fingerprint") != fingerprint:
        raise ArtifactError(f"{path}: made from another dataset (fingerprint {obj.get('fingerprint')}, this dataset "
                            f"is {fingerprint}); rerun the stage that made it on this dataset directory")
    if item_ids is not None and list(obj.get("item_ids", [])) != list(item_ids):
        raise ArtifactError(f"{path}: its item ids differ from the dataset's items.jsonl; rerun the stage that made it "
                            f"(and the stages after it)")
    return obj
