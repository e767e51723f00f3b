"""Dataset converters: build the canonical dataset directory every DMESR stage reads.

    python data/prepare.py synthetic --out data/toy                       # ~200 items, ~1500 users, rendered images
    python data/prepare.py synthetic --out data/big --items 1000000 --users 1000000 --no-images
    python data/prepare.py beauty    --out data/beauty                    # ../shared/data/amazon/Beauty.txt + titles
    python data/prepare.py sports    --out data/sports                    # ID-only (no item text)
    python data/prepare.py movielens --out data/ml300 --top-items 300     # ratings + title/genres/tags + posters
    python data/prepare.py amazon2023 --reviews All_Beauty.jsonl.gz --meta meta_All_Beauty.jsonl.gz --out data/ab
    python data/prepare.py recbole --src dataset/ml-100k --name ml-100k --out data/ml100k   # RecBole atomic files

Writes DIR/interactions.csv (user_id,item_id,timestamp), DIR/items.jsonl (item_id, title, brand, categories, price,
description, image), DIR/images/, and DIR/prepare_config.json (the exact arguments). Prints one JSON line on stdout:
{"users": ..., "items": ..., "interactions": ..., "items_with_image": ...}; progress and warnings go to stderr.
A relative default --src resolves against the repository root (../shared/data/<amazon|movielens>).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import re
import shutil
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
from common import log, setup_logging, write_text_atomic  # noqa: E402  (the repository's shared module)


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: writing the canonical directory (atomically, common.write_text_atomic), k-core, bad-input errors
# ----------------------------------------------------------------------------------------------------------------------

class PrepareError(ValueError):
    """Bad source input, with the file, line and field that caused it."""


def write_dataset(out: Path, user_names, item_names, u, i, t, items: list[dict]) -> dict:
    """Write interactions (integer arrays u, i, t indexing user_names / item_names) and item objects.

    Rows are written user by user, chronologically (stable, so ties keep source order); the loader re-sorts anyway.
    """
    u, i, t = np.asarray(u), np.asarray(i), np.asarray(t)
    if len(u) == 0:
        raise PrepareError("no interactions left to write (a filter such as --kcore or --top-items removed them all)")
    out.mkdir(parents=True, exist_ok=True)
    order = np.lexsort((np.arange(len(u)), t, u))
    u, i, t = u[order], i[order], t[order]
    names = "".join(map(str, user_names)) + "".join(map(str, item_names))
    needs_quoting = any(ch in names for ch in ',"\r\n')

    def rows(chunk=500_000):
        yield "user_id,item_id,timestamp\n"
        tt = t.astype(np.int64) if np.all(t == np.floor(t)) else t
        for s in range(0, len(u), chunk):
            us, is_, ts = u[s:s + chunk].tolist(), i[s:s + chunk].tolist(), tt[s:s + chunk].tolist()
            if needs_quoting:
                buf = io.StringIO()
                csv.writer(buf, lineterminator="\n").writerows(
                    (user_names[a], item_names[b], c) for a, b, c in zip(us, is_, ts))
                yield buf.getvalue()
            else:
                yield "".join(f"{user_names[a]},{item_names[b]},{c}\n" for a, b, c in zip(us, is_, ts))

    write_text_atomic(out / "interactions.csv", rows())
    encode = json.JSONEncoder(ensure_ascii=False).encode  # one encoder: json.dumps builds a new one per call
    write_text_atomic(out / "items.jsonl", (encode(m) + "\n" for m in items))
    return {"users": int(len(np.unique(u))), "items": len(items), "interactions": int(len(u)),
            "items_with_image": sum(1 for m in items if m.get("image"))}


def kcore(u: np.ndarray, i: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the rows left by an iterative k-core (every kept user and item has >= k rows)."""
    keep = np.ones(len(u), dtype=bool)
    if k <= 1:
        return keep
    while True:
        uc = np.bincount(u[keep], minlength=u.max() + 1 if len(u) else 0)
        ic = np.bincount(i[keep], minlength=i.max() + 1 if len(i) else 0)
        new = keep & (uc[u] >= k) & (ic[i] >= k)
        if new.sum() == keep.sum():
            return keep
        keep = new


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if str(path).endswith(".gz") else open(path, encoding="utf-8")


def _need(path: Path) -> Path:
    if not path.is_file():
        raise PrepareError(f"{path}: file not found")
    return path


def _safe_name(item_id: str) -> str:
    """A file name for an item id; ids with unusual characters get a hash suffix so two never collide."""
    s = re.sub(r"[^A-Za-z0-9._-]", "_", item_id)
    return s if s == item_id else f"{s[:80]}_{hashlib.sha1(item_id.encode()).hexdigest()[:8]}"


# ----------------------------------------------------------------------------------------------------------------------
# synthetic: products whose shape/colour/pattern live only in the image, brand/price only in the text, category in
# both; users with latent tastes over both kinds, Zipf popularity and category-level sequential structure.
# ----------------------------------------------------------------------------------------------------------------------

CATEGORIES = [("Kitchen", ["mug", "kettle", "bowl", "jar"]),
              ("Garden", ["planter", "watering can", "lantern", "feeder"]),
              ("Toys", ["puzzle", "plush toy", "building set", "spinning top"]),
              ("Beauty", ["lotion", "perfume", "compact", "soap"]),
              ("Office", ["organizer", "desk lamp", "notebook", "pen holder"]),
              ("Sports", ["water bottle", "yoga block", "ball", "headband"]),
              ("Home", ["cushion", "vase", "clock", "candle"]), ("Pets", ["pet bed", "chew toy", "collar", "bowl set"]),
              ("Travel", ["pouch", "luggage tag", "neck pillow", "toiletry bag"]),
              ("Music", ["tuner", "capo", "drumsticks", "music stand"])]
CAT_BACKGROUND = [(235, 235, 235), (205, 225, 250), (210, 240, 210), (250, 235, 205), (230, 215, 245),
                  (250, 215, 225), (215, 240, 240), (240, 240, 200), (200, 200, 215), (245, 225, 200)]
COLOURS = {"red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (235, 205, 25), "green": (35, 150, 55),
           "blue": (35, 75, 205), "purple": (135, 55, 185), "pink": (240, 110, 175), "black": (30, 30, 30)}
SHAPES = ["circle", "square", "triangle", "diamond", "star", "hexagon"]
PATTERNS = ["plain", "stripes", "dots", "checks"]
BRANDS = ["Acme", "Borealis", "Cobalt", "Dune", "Ember", "Fjord", "Granite", "Halcyon", "Ivory", "Juniper", "Kestrel",
          "Lumen"]
PRICE_BANDS = [("budget", 3, 15), ("mid-range", 15, 40), ("premium", 40, 100), ("luxury", 100, 300)]
TASTES = ["colour", "shape", "pattern", "brand", "price"]  # the latent tastes: three image-only, two text-only
CANDIDATES = 32  # items drawn per step, among which the user's tastes pick (sampling-importance-resampling)
USER_CHUNK = 100_000  # users per vectorised block: bounds the (users x candidates) arrays at any scale


class _Buckets:
    """Items grouped by an integer key; draws an item of a given key with probability proportional to its weight.

    One Walker/Vose alias table per key makes every draw O(1) (two uniforms, two gathers): a binary search per draw
    made the 1M-item catalogue ten times slower.
    """

    def __init__(self, key: np.ndarray, n_keys: int, weight: np.ndarray):
        self.order = np.argsort(key, kind="stable")
        counts = np.bincount(key, minlength=n_keys)
        self.end = np.cumsum(counts)
        self.start = self.end - counts
        w = weight[self.order].astype(np.float64)
        self.prob, self.alias = np.ones(len(w)), np.arange(len(w))
        for s, e in zip(self.start.tolist(), self.end.tolist()):
            if e - s < 2:
                continue
            q = (w[s:e] * ((e - s) / w[s:e].sum())).tolist()
            alias = list(range(s, e))
            small = [j for j, x in enumerate(q) if x < 1.0]
            large = [j for j, x in enumerate(q) if x >= 1.0]
            while small and large:
                lo, hi = small.pop(), large.pop()
                alias[lo] = s + hi
                q[hi] -= 1.0 - q[lo]
                (small if q[hi] < 1.0 else large).append(hi)
            for j in small + large:  # leftovers are 1 up to rounding
                q[j] = 1.0
            self.prob[s:e], self.alias[s:e] = q, alias

    def uniform(self, keys: np.ndarray, rng) -> np.ndarray:
        """One item per key, uniformly within its bucket; -1 where the bucket is empty."""
        s, cnt = self.start[keys], self.end[keys] - self.start[keys]
        slot = np.minimum(s + (rng.random(len(keys)) * cnt).astype(np.int64), len(self.order) - 1)
        return np.where(cnt > 0, self.order[slot], -1)

    def sample(self, keys: np.ndarray, rng) -> np.ndarray:
        """One item per key; -1 where the bucket is empty."""
        s, cnt = self.start[keys], self.end[keys] - self.start[keys]
        slot = s + np.minimum((rng.random(len(keys)) * cnt).astype(np.int64), np.maximum(cnt - 1, 0))
        slot = np.minimum(slot, len(self.order) - 1)
        slot = np.where(rng.random(len(keys)) < self.prob[slot], slot, self.alias[slot])
        return np.where(cnt > 0, self.order[slot], -1)


def render_product(path: Path, cat: int, colour: str, shape: str, pattern: str, size: int, rng) -> None:
    """Draw one product photo: category = background, the object's shape, colour and pattern only here."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), CAT_BACKGROUND[cat])
    fill = Image.new("RGB", (size, size), COLOURS[colour])
    d = ImageDraw.Draw(fill)
    ink = (250, 250, 250) if colour != "yellow" else (60, 60, 60)
    step = int(size * rng.uniform(0.09, 0.13))
    if pattern == "stripes":
        for x in range(-size, size, step):
            d.line([(x, 0), (x + size, size)], fill=ink, width=max(2, step // 3))
    elif pattern == "dots":
        r = max(2, step // 4)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    elif pattern == "checks":
        for y in range(0, size, step):
            for x in range((y // step) % 2 * step, size, 2 * step):
                d.rectangle([x, y, x + step - 1, y + step - 1], fill=ink)
    # the object's outline, with a little jitter so two items with the same attributes are different photos
    cx, cy = size / 2 + rng.uniform(-0.06, 0.06) * size, size / 2 + rng.uniform(-0.06, 0.06) * size
    r, rot = size * rng.uniform(0.28, 0.38), rng.uniform(-0.25, 0.25)
    if shape == "circle":
        pts = None
    else:  # regular polygons (square = a diamond turned by 45 degrees) and a five-pointed star
        n, inner, turn = {"square": (4, None, math.pi / 4), "triangle": (3, None, 0.0), "diamond": (4, None, 0.0),
                          "star": (5, 0.45, 0.0), "hexagon": (6, None, 0.0)}[shape]
        corners = 2 * n if inner else n
        pts = []
        for k in range(corners):
            rr = r * 1.15 * (inner if inner and k % 2 else 1.0)
            ang = rot + turn - math.pi / 2 + 2 * math.pi * k / corners
            pts.append((cx + rr * math.cos(ang), cy + rr * math.sin(ang)))
    mask = Image.new("L", (size, size), 0)
    md = ImageDraw.Draw(mask)
    od = ImageDraw.Draw(img)
    if pts is None:
        box = [cx - r, cy - r, cx + r, cy + r]
        md.ellipse(box, fill=255)
        img.paste(fill, mask=mask)
        od.ellipse(box, outline=(40, 40, 40), width=2)
    else:
        md.polygon(pts, fill=255)
        img.paste(fill, mask=mask)
        od.polygon(pts, outline=(40, 40, 40), width=2)
    img.save(path, format="PNG", optimize=False)


def build_synthetic(a) -> dict:
    rng = np.random.default_rng(a.seed)
    n, m, C = a.items, a.users, a.categories
    if not 1 <= C <= len(CATEGORIES):
        raise PrepareError(f"--categories must be in 1..{len(CATEGORIES)}, got {C}")
    if n < 1 or m < 1:
        raise PrepareError("--items and --users must be positive")
    K, S, P, B, R = len(COLOURS), len(SHAPES), len(PATTERNS), len(BRANDS), len(PRICE_BANDS)

    # ---- the catalogue: latent attributes and a Zipf-like popularity (random rank per item) ----
    sizes = {"cat": C, "colour": K, "shape": S, "pattern": P, "brand": B, "price": R}
    attrs = {k: rng.integers(v, size=n).astype(np.int8) for k, v in sizes.items()}  # int8: cache-friendly gathers
    popularity = 1.0 / (1.0 + rng.permutation(n)) ** a.zipf
    by_cat = _Buckets(attrs["cat"], C, popularity)
    cat_size = np.maximum(np.bincount(attrs["cat"], minlength=C), 1)
    cat_weight = np.maximum(np.bincount(attrs["cat"], weights=popularity, minlength=C), 1e-300)
    # candidates come half by popularity, half uniformly within the category: proposal q(i) depends on i alone, so the
    # importance weight log(popularity / q) of every item is computed once
    q = 0.5 * popularity / cat_weight[attrs["cat"]] + 0.5 / cat_size[attrs["cat"]]
    log_w = np.log(popularity / q).astype(np.float32)
    # a companion item ("bought X, then Y") in the next category: sequential structure an ID model can learn
    companion = by_cat.sample((attrs["cat"] + 1) % C, rng)
    companion = np.where(companion >= 0, companion, rng.integers(n, size=n))
    # the items' text details, drawn before any user: the catalogue (text and images) depends on --seed and the item
    # flags only, so user-side variants of a dataset share one stage-1 run (its cache is keyed by the prompts)
    noun_pick = rng.integers(4, size=n)
    price = np.empty(n)
    for k, (_, lo, hi) in enumerate(PRICE_BANDS):
        sel = attrs["price"] == k
        price[sel] = rng.uniform(lo, hi, size=sel.sum())
    model_no = rng.integers(100, 1000, size=n)
    # new arrivals: the last --new-items of the catalogue is released at the end of the log, so users meet these items
    # only in their final two steps (the validation and test targets) and no training interaction holds one: IDs
    # cannot learn them, their content is all there is to go on (cold-start items, the sparsity DMESR is for)
    new = np.zeros(n, dtype=bool)
    new[rng.permutation(n)[:int(round(a.new_items * n))]] = True

    # ---- users: latent tastes over image-only and text-only attributes, then sequences step by step ----
    # Each step: a category from a Markov chain (stay / next category / back to the favourite), CANDIDATES items of it,
    # and a Gumbel-max pick over log(popularity / q) + taste * #matching attributes (sampling-importance-resampling):
    # P(item) ~ popularity * exp(taste * #matching attributes), so content explains choices that popularity cannot.
    t0 = time.time()
    taste = {k: rng.integers(v, size=m).astype(np.int8) for k, v in sizes.items()}
    max_len = 50
    lengths = np.minimum(5 + rng.geometric(1.0 / max(1.0, a.avg_len - 4.0), size=m) - 1, max_len)
    hist = np.full((m, max_len), -1, dtype=np.int64)
    for t in tqdm(range(max_len), desc="synthetic sequences", unit="step", file=sys.stderr, disable=m < 100_000):
        idx = np.flatnonzero(lengths > t)
        if len(idx) == 0:
            break
        for c0 in range(0, len(idx), USER_CHUNK):
            ix = idx[c0:c0 + USER_CHUNK]
            if t == 0:
                cat = taste["cat"][ix]
            else:
                prev = attrs["cat"][hist[ix, t - 1]]
                r = rng.random(len(ix))
                cat = np.where(r < 0.5, prev, np.where(r < 0.8, (prev + 1) % C, taste["cat"][ix]))
            keys = np.repeat(cat, CANDIDATES // 2)
            cand = np.concatenate([by_cat.sample(keys, rng).reshape(len(ix), -1),
                                   by_cat.uniform(keys, rng).reshape(len(ix), -1)], axis=1)
            cand = np.where(cand >= 0, cand, rng.integers(n, size=cand.shape))  # an empty category: any item
            match = sum((attrs[k][cand] == taste[k][ix, None]) for k in TASTES)
            gumbel = -np.log(-np.log(rng.random(cand.shape, dtype=np.float32) + np.float32(1e-12)))
            score = log_w[cand] + np.float32(a.taste) * match + gumbel
            score[new[cand] & (t < lengths[ix, None] - 2)] = -np.inf  # not released yet
            for _ in range(4):  # users rarely buy the same product twice: take the best candidate not yet bought
                item = cand[np.arange(len(ix)), score.argmax(1)]
                rep = np.flatnonzero((hist[ix, :t] == item[:, None]).any(1)) if t else np.zeros(0, dtype=np.int64)
                if len(rep) == 0:
                    break
                score[rep] = np.where(cand[rep] == item[rep, None], -np.inf, score[rep])
            if t > 0:
                nxt = companion[hist[ix, t - 1]]
                follow = (rng.random(len(ix)) < a.companion) & ~(hist[ix, :t] == nxt[:, None]).any(1)
                follow &= ~new[nxt] | (t >= lengths[ix] - 2)
                item = np.where(follow, nxt, item)
            hist[ix, t] = item

    log.info(f"synthetic: {lengths.sum()} interactions drawn in {time.time() - t0:.1f}s "
             f"({lengths.sum() / (time.time() - t0):,.0f}/s)")
    valid = np.arange(max_len)[None, :] < lengths[:, None]
    u = np.repeat(np.arange(m), lengths)
    i = hist[valid]
    start = rng.integers(0, 10_000_000, size=m)
    t = (start[:, None] + np.arange(max_len)[None, :] * 3600 + rng.integers(0, 3000, size=(m, max_len)))[valid]

    # ---- item text (brand, price band and category only) and images (category, shape, colour, pattern) ----
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if not a.no_images:
        (out / "images").mkdir(exist_ok=True)
    colour_names = list(COLOURS)
    items, truth = [], ["item_id,category,colour,shape,pattern,brand,price_band"]
    width = len(str(n - 1))
    cols = zip(*(attrs[k].tolist() for k in ("cat", "colour", "shape", "pattern", "brand", "price")),
               noun_pick.tolist(), model_no.tolist(), price.tolist())  # plain ints: numpy scalars are slow per item
    for k, (c, col, shp, pat, b, pb, noun, model, pr) in enumerate(
            tqdm(cols, total=n, desc="synthetic items", unit="item", file=sys.stderr,
                 disable=n < 5000 and a.no_images)):
        col, shp, pat, b, pb = colour_names[col], SHAPES[shp], PATTERNS[pat], BRANDS[b], PRICE_BANDS[pb][0]
        cname, noun = CATEGORIES[c][0], CATEGORIES[c][1][noun]
        iid = f"item{k:0{width}d}"
        meta = {"item_id": iid, "title": f"{b} {noun} {cname[0]}{model}", "brand": b, "categories": [cname],
                "price": f"{pr:.2f}", "description": f"A {pb} {noun} from the {b} {cname.lower()} range."}
        if not a.no_images:
            render_product(out / "images" / f"{iid}.png", c, col, shp, pat, a.image_size,
                           np.random.default_rng([a.seed, k]))
            meta["image"] = f"images/{iid}.png"
        items.append(meta)
        truth.append(f"{iid},{cname},{col},{shp},{pat},{b},{pb}")
    uwidth = len(str(m - 1))
    user_names = [f"user{k:0{uwidth}d}" for k in range(m)]
    # the generating truth (item attributes, user tastes), for analysis and tests only: no stage reads these files
    write_text_atomic(out / "synthetic_attributes.csv", ("\n".join(truth) + "\n",))
    names = {"cat": [c for c, _ in CATEGORIES], "colour": colour_names, "shape": SHAPES, "pattern": PATTERNS,
             "brand": BRANDS, "price": [b for b, _, _ in PRICE_BANDS]}
    cols = {k: np.asarray(v)[taste[k]] for k, v in names.items()}
    write_text_atomic(out / "synthetic_users.csv", ["user_id,category,colour,shape,pattern,brand,price_band\n"] + [
        ",".join(row) + "\n" for row in zip(user_names, *(cols[k].tolist() for k in names))])
    return write_dataset(out, user_names, [it["item_id"] for it in items], u, i, t, items)


# ----------------------------------------------------------------------------------------------------------------------
# beauty / sports: the standard 5-core split files (one line per user: user item item ..., chronological)
# ----------------------------------------------------------------------------------------------------------------------

def _read_seq_file(path: Path):
    users, u, i, t = [], [], [], []
    with open(_need(path), encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2:
                raise PrepareError(f"{path}:{lineno}: expected 'user_id item_id item_id ...', got {line.strip()!r}")
            users.append(parts[0])
            for pos, iid in enumerate(parts[1:]):
                u.append(len(users) - 1)
                i.append(iid)
                t.append(pos)  # the file is chronological; the position is the only clock it has
    return users, u, i, t


def build_seq_file(a, name: str, titles: Path | None) -> dict:
    src = Path(a.src)
    users, u, i, t = _read_seq_file(src / f"{name}.txt")
    meta: dict[str, dict] = {}
    if titles is not None:
        with open(_need(titles), encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)  # titles may start with a quote
            header = next(rows, None)
            if header is None or header[:3] != ["item_id", "asin", "title"]:
                raise PrepareError(f"{titles}:1: header must be 'item_id<TAB>asin<TAB>title', got {header!r}")
            for row in rows:
                if len(row) != 3:
                    raise PrepareError(f"{titles}:{rows.line_num}: expected 3 tab-separated fields, got {len(row)}")
                if row[0] in meta:
                    raise PrepareError(f"{titles}:{rows.line_num}: field 'item_id': duplicate item id {row[0]!r}")
                meta[row[0]] = {"item_id": row[0], "title": row[2], "asin": row[1]}
        missing = sorted(set(i) - set(meta), key=lambda s: (len(s), s))
        if missing:
            raise PrepareError(f"{titles}: field 'item_id': {len(missing)} item id(s) used in {name}.txt have no "
                               f"row, e.g. {missing[0]!r}")
    item_names = sorted(set(i), key=lambda s: (len(s), s))  # numeric ids in numeric order
    index = {s: k for k, s in enumerate(item_names)}
    items = [meta.get(s, {"item_id": s}) for s in item_names]
    return write_dataset(Path(a.out), users, item_names, u, [index[s] for s in i], t, items)


# ----------------------------------------------------------------------------------------------------------------------
# movielens: ratings as interactions; text = title + genres + most frequent tags; image = the poster
# ----------------------------------------------------------------------------------------------------------------------

def _read_csv(path: Path, fields: list[str]):
    with open(_need(path), encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None or header[:len(fields)] != fields:
            raise PrepareError(f"{path}:1: header must start with {','.join(fields)}, got {header!r}")
        for row in rows:
            if len(row) != len(header):
                raise PrepareError(f"{path}:{rows.line_num}: expected {len(header)} fields, got {len(row)}: {row!r}")
            yield rows.line_num, row


def build_movielens(a) -> dict:
    src, out = Path(a.src), Path(a.out)
    posters = {p.stem for p in (src / "posters").glob("*.jpg")} if (src / "posters").is_dir() else set()
    uid, u, mv, ts = {}, [], [], []
    for lineno, (user, movie, _rating, stamp) in _read_csv(src / "ratings.csv", ["userId", "movieId", "rating",
                                                                                 "timestamp"]):
        if not movie.isdigit():
            raise PrepareError(f"{src / 'ratings.csv'}:{lineno}: field 'movieId': {movie!r} is not a movie id")
        try:
            ts.append(int(stamp))
        except ValueError:
            raise PrepareError(f"{src / 'ratings.csv'}:{lineno}: field 'timestamp': {stamp!r} is not an integer") \
                from None
        u.append(uid.setdefault(user, len(uid)))
        mv.append(movie)
    movie_names = sorted(set(mv), key=int)
    mindex = {s: k for k, s in enumerate(movie_names)}
    u, i, t = np.asarray(u), np.asarray([mindex[s] for s in mv]), np.asarray(ts)

    has_poster = np.array([s in posters for s in movie_names])
    keep = has_poster[i]
    if a.top_items:  # the N most-rated movies that have a poster (ties: smaller movieId first)
        counts = np.bincount(i[keep], minlength=len(movie_names))
        ranked = sorted((k for k in range(len(movie_names)) if has_poster[k]), key=lambda k: (-counts[k], k))
        top = np.zeros(len(movie_names), dtype=bool)
        top[ranked[:a.top_items]] = True
        keep &= top[i]
    u, i, t = u[keep], i[keep], t[keep]
    keep = kcore(u, i, a.kcore)
    u, i, t = u[keep], i[keep], t[keep]
    log.info(f"movielens: {keep.sum()} ratings after poster/top-items filter and {a.kcore}-core")

    meta = {row[0]: row for _, row in _read_csv(src / "movies.csv", ["movieId", "title", "genres"])}
    tags: dict[str, Counter] = defaultdict(Counter)
    if (src / "tags.csv").is_file():
        for _, (_user, movie, tag, _stamp) in _read_csv(src / "tags.csv", ["userId", "movieId", "tag", "timestamp"]):
            if tag.strip():
                tags[movie][tag.strip().lower()] += 1
    used = np.unique(i)
    (out / "images").mkdir(parents=True, exist_ok=True)
    items, new_index = [], np.full(len(movie_names), -1)
    for k in used:
        s = movie_names[k]
        row = meta.get(s)
        it = {"item_id": s}
        if row is None:
            log.warning(f"{src / 'movies.csv'}: movie {s} is rated but has no row; it keeps no text")
        else:
            it["title"] = row[1]
            genres = [g for g in row[2].split("|") if g and g != "(no genres listed)"]
            if genres:
                it["categories"] = genres
        top_tags = sorted(tags.get(s, {}).items(), key=lambda kv: (-kv[1], kv[0]))[:a.tags]
        if top_tags:
            it["description"] = "Tags: " + ", ".join(tag for tag, _ in top_tags)
        dst = out / "images" / f"{s}.jpg"
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        try:  # a hard link stays inside the dataset directory; a symlink out of it is refused by the loader
            if not a.link:
                raise OSError
            os.link(src / "posters" / f"{s}.jpg", dst)
        except OSError:  # (another file system, or no --link)
            shutil.copyfile(src / "posters" / f"{s}.jpg", dst)
        it["image"] = f"images/{s}.jpg"
        new_index[k] = len(items)
        items.append(it)
    users = list(uid)
    return write_dataset(out, users, [it["item_id"] for it in items], u, new_index[i], t, items)


# ----------------------------------------------------------------------------------------------------------------------
# amazon2023: raw review + metadata JSONL(.gz) of Amazon Reviews 2023; images fetched from the metadata's URLs
# ----------------------------------------------------------------------------------------------------------------------

RETRY_HTTP = {408, 425, 429, 500, 502, 503, 504}


def _image_format(path: Path) -> str | None:
    """The PIL format name if the file is a decodable image, else None."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            fmt = im.format
            im.verify()
        return fmt
    except Exception:  # any decoder failure means "not a usable image"
        return None


def fetch_image(url: str, cache: Path, timeout: float, retries: int, backoff: float, max_bytes: int):
    """Return (cached_path, None) or (None, reason). Cached by URL hash; retries transient errors with backoff."""
    dst = cache / hashlib.sha256(url.encode()).hexdigest()[:32]
    if dst.is_file() and _image_format(dst):
        return dst, None
    reason = "not tried"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        tmp = dst.with_name(f"{dst.name}.part{os.getpid()}_{threading.get_ident()}")  # two items may share a URL
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "dmesr-prepare/1.0"})
            t0 = time.monotonic()
            with urllib.request.urlopen(req, timeout=timeout) as r, open(tmp, "wb") as f:
                got = 0
                while chunk := r.read(65536):
                    got += len(chunk)
                    if got > max_bytes:
                        raise ValueError(f"larger than {max_bytes} bytes")
                    if time.monotonic() - t0 > timeout:  # a server trickling bytes must not hold a worker forever
                        raise TimeoutError(f"no complete reply within {timeout}s")
                    f.write(chunk)
                expected = r.headers.get("Content-Length", "")
                if expected.isdigit() and got != int(expected):  # the server hung up early: worth another try
                    raise ConnectionError(f"truncated reply, {got} of {expected} bytes")
            if not _image_format(tmp):
                return None, "corrupt image (cannot be decoded)"  # a complete but broken file will not heal on retry
            os.replace(tmp, dst)
            return dst, None
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code}"
            if e.code not in RETRY_HTTP:
                return None, reason
        except ValueError as e:
            return None, str(e)
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, socket.timeout, OSError) as e:
            why = getattr(e, "reason", e)
            reason = "timeout" if isinstance(why, (TimeoutError, socket.timeout)) else f"{type(why).__name__}: {why}"
        finally:
            if tmp.exists():
                tmp.unlink()
    return None, f"{reason} (after {retries + 1} attempts)"


def download_images(jobs: list[tuple[str, str]], out: Path, cache: Path, timeout=10.0, retries=3, backoff=0.5,
                    workers=8, max_bytes=20_000_000) -> tuple[dict[str, str], list[dict]]:
    """Fetch (item_id, url) pairs into out/images/ through a local cache with a small thread pool.

    Returns ({item_id: relative image path}, failures); every failure is {item_id, url, reason}.
    """
    cache.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ok, failures = {}, []
    with cf.ThreadPoolExecutor(max_workers=workers) as pool:
        futs = {pool.submit(fetch_image, url, cache, timeout, retries, backoff, max_bytes): (iid, url)
                for iid, url in jobs}
        for fut in tqdm(cf.as_completed(futs), total=len(futs), desc="images", unit="img", file=sys.stderr,
                        disable=len(futs) < 50):
            iid, url = futs[fut]
            try:
                path, reason = fut.result()
            except Exception as e:  # one odd reply must not cost the other downloads; it is reported like the rest
                path, reason = None, f"{type(e).__name__}: {e}"
            if path is None:
                failures.append({"item_id": iid, "url": url, "reason": reason})
                continue
            ext = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp"}.get(_image_format(path), ".img")
            rel = f"images/{_safe_name(iid)}{ext}"
            shutil.copyfile(path, out / rel)
            ok[iid] = rel
    failures.sort(key=lambda f: f["item_id"])
    return ok, failures


def _main_image_url(images) -> str | None:
    if not isinstance(images, list) or not images:
        return None
    best = next((im for im in images if isinstance(im, dict) and im.get("variant") == "MAIN"), images[0])
    if not isinstance(best, dict):
        return None
    return best.get("large") or best.get("hi_res") or best.get("thumb")


def _as_text(v) -> str:
    if isinstance(v, list):
        return " ".join(str(x).strip() for x in v if str(x).strip())
    return "" if v is None else str(v).strip()


def _find(path: Path) -> Path:
    """PATH as given, or PATH.gz / PATH without .gz: the release ships .jsonl.gz, users often unpack it."""
    for p in (path, Path(str(path) + ".gz"), Path(str(path).removesuffix(".gz"))):
        if p.is_file():
            return p
    raise PrepareError(f"{path}: file not found (nor with/without .gz)")


def _jsonl(path: Path, desc: str):
    """(line number, object) for every non-blank line of a JSONL(.gz) file; bad JSON names file and line."""
    with _open_text(path) as f:
        for lineno, line in enumerate(tqdm(f, desc=desc, unit="line", file=sys.stderr, mininterval=2), 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None


def build_amazon2023(a) -> dict:
    out = Path(a.out)
    reviews = _find(Path(a.reviews) if a.reviews else Path(a.src) / f"{a.category}.jsonl")
    metas = _find(Path(a.meta) if a.meta else Path(a.src) / f"meta_{a.category}.jsonl")

    uid, iid, u, i, t = {}, {}, [], [], []
    for lineno, r in _jsonl(reviews, "reviews"):
        item = r.get("parent_asin") or r.get("asin")
        for name, val in (("user_id", r.get("user_id")), ("parent_asin", item), ("timestamp", r.get("timestamp"))):
            if val in (None, ""):
                raise PrepareError(f"{reviews}:{lineno}: field {name!r} is missing or empty")
        try:
            t.append(int(r["timestamp"]))
        except (TypeError, ValueError):
            raise PrepareError(f"{reviews}:{lineno}: field 'timestamp': {r['timestamp']!r} is not an integer "
                               f"(milliseconds)") from None
        u.append(uid.setdefault(r["user_id"], len(uid)))
        i.append(iid.setdefault(item, len(iid)))
    u, i, t = np.asarray(u, dtype=np.int64), np.asarray(i, dtype=np.int64), np.asarray(t, dtype=np.int64)
    # one interaction per (user, item): the first one in time (repeat reviews are not repeat purchases)
    order = np.lexsort((np.arange(len(u)), t, i, u))
    first = np.ones(len(order), dtype=bool)
    first[1:] = (u[order][1:] != u[order][:-1]) | (i[order][1:] != i[order][:-1])
    keep = np.zeros(len(u), dtype=bool)
    keep[order[first]] = True
    log.info(f"amazon2023: {len(u)} reviews, {int((~keep).sum())} repeat (user, item) reviews dropped")
    u, i, t = u[keep], i[keep], t[keep]
    keep = kcore(u, i, a.kcore)
    u, i, t = u[keep], i[keep], t[keep]
    item_names, user_names = list(iid), list(uid)
    used = set(np.unique(i).tolist())
    wanted = {item_names[k] for k in used}

    meta: dict[str, dict] = {}
    for _, m in _jsonl(metas, "metadata"):
        key = m.get("parent_asin") or m.get("asin")
        if key in wanted and key not in meta:
            meta[key] = m
    items, jobs = [], []
    new_index = np.full(len(item_names), -1)
    for k in sorted(used):
        name = item_names[k]
        m = meta.get(name, {})
        it = {"item_id": name}
        if _as_text(m.get("title")):
            it["title"] = _as_text(m.get("title"))
        if _as_text(m.get("store")):
            it["brand"] = _as_text(m.get("store"))
        cats = [c for c in (m.get("categories") or []) if c] or ([m["main_category"]] if m.get("main_category") else [])
        if cats:
            it["categories"] = cats
        if m.get("price") not in (None, "", "None"):
            it["price"] = str(m["price"])
        desc = " ".join(x for x in (_as_text(m.get("features")), _as_text(m.get("description"))) if x)
        if desc:
            it["description"] = desc[:a.max_description_chars]
        url = _main_image_url(m.get("images"))
        if url and not a.no_images:
            jobs.append((name, url))
        new_index[k] = len(items)
        items.append(it)
    no_meta = sum(1 for k in used if item_names[k] not in meta)
    if no_meta:
        log.warning(f"{metas}: {no_meta} item(s) have no metadata row; they are kept without text")

    failures = []
    if jobs:
        cache = Path(a.image_cache) if a.image_cache else \
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dmesr" / "amazon2023_images"
        ok, failures = download_images(jobs, out, cache, a.timeout, a.retries, a.backoff, a.workers)
        for it in items:
            if it["item_id"] in ok:
                it["image"] = ok[it["item_id"]]
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "image_failures.jsonl", (json.dumps(f_) + "\n" for f_ in failures))
        if failures:
            log.warning(f"{len(failures)} of {len(jobs)} image(s) failed (items keep their text); every failure is "
                        f"listed in {out / 'image_failures.jsonl'}; reasons: "
                        f"{dict(Counter(f_['reason'].split(' (')[0] for f_ in failures))}")
    return write_dataset(out, user_names, [it["item_id"] for it in items], u, new_index[i], t, items)


# ----------------------------------------------------------------------------------------------------------------------
# recbole: RecBole's atomic files (NAME.inter + optional NAME.item), tab-separated with typed headers
# ----------------------------------------------------------------------------------------------------------------------

RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
TITLE_FIELDS = ("title", "movie_title", "name")  # the .item column that becomes `title`, first found; others by name:
CANONICAL_FIELDS = {"brand": "brand", "categories": "categories", "genre": "categories", "genres": "categories",
                    "class": "categories", "price": "price", "description": "description"}


def _recbole_rows(path: Path, need: dict[str, str]):
    """(columns {name: index}, types {name: type}, rows as (line number, fields)) of one atomic file; `need` = {field:
    type} that must be present with that type. The header is name:type per column; a malformed one names its column."""
    def reader(f):  # RecBole's files are plain tab-joined, never quoted
        return csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)

    with open(_need(path), encoding="utf-8", newline="") as f:
        header = next(reader(f), None)
    if not header:
        raise PrepareError(f"{path}:1: empty file (expected a typed header such as 'user_id:token')")
    cols, types = {}, {}
    for k, h in enumerate(header, 1):
        name, _, typ = h.strip().rpartition(":")
        if not name or typ not in RECBOLE_TYPES:
            raise PrepareError(f"{path}:1: column {k} {h!r}: a typed header is 'name:type' with type one of "
                               f"{', '.join(RECBOLE_TYPES)}")
        if name in cols:
            raise PrepareError(f"{path}:1: column {k} {h!r}: field {name!r} appears twice")
        cols[name], types[name] = k - 1, typ
    for name, typ in need.items():
        if name not in cols:
            raise PrepareError(f"{path}:1: no field {name!r} in the header {header!r} (choose the field by name with "
                               f"--user-field / --item-field)")
        if types[name] != typ:
            raise PrepareError(f"{path}:1: field {name!r} is declared {types[name]}, expected {typ}")

    def body():
        with open(path, encoding="utf-8", newline="") as f:
            rows = reader(f)
            next(rows)
            for row in rows:
                if not row or row == [""]:
                    continue
                if len(row) != len(header):
                    raise PrepareError(f"{path}:{rows.line_num}: expected {len(header)} tab-separated fields "
                                       f"({', '.join(cols)}), got {len(row)}")
                yield rows.line_num, row
    return cols, types, body()


def build_recbole(a) -> dict:
    src = Path(a.src)
    inter, item_file = src / f"{a.name}.inter", src / f"{a.name}.item"
    cols, types, rows = _recbole_rows(inter, {a.user_field: "token", a.item_field: "token"})
    t_col = cols.get(a.time_field)
    if t_col is None:
        log.warning(f"{inter}: no {a.time_field!r} field; each user's rows are taken in file order")
    elif types[a.time_field] != "float":
        raise PrepareError(f"{inter}:1: field {a.time_field!r} is declared {types[a.time_field]}, expected float")
    uid, iid, u, i, t = {}, {}, [], [], []
    for lineno, row in rows:
        user, item = row[cols[a.user_field]], row[cols[a.item_field]]
        for name, val in ((a.user_field, user), (a.item_field, item)):
            if not val:
                raise PrepareError(f"{inter}:{lineno}: field {name!r} is empty")
        if t_col is None:
            t.append(float(lineno))
        else:
            try:
                t.append(float(row[t_col]))
            except ValueError:
                t.append(float("nan"))
            if not math.isfinite(t[-1]):
                raise PrepareError(f"{inter}:{lineno}: field {a.time_field!r}: {row[t_col]!r} is not a finite number")
        u.append(uid.setdefault(user, len(uid)))
        i.append(iid.setdefault(item, len(iid)))
    u, i, t = np.asarray(u, dtype=np.int64), np.asarray(i, dtype=np.int64), np.asarray(t, dtype=np.float64)
    keep = kcore(u, i, a.kcore)
    u, i, t = u[keep], i[keep], t[keep]
    item_names = list(iid)
    used = np.unique(i)
    wanted = {item_names[k] for k in used}

    meta: dict[str, dict] = {}
    if item_file.is_file():
        icols, itypes, irows = _recbole_rows(item_file, {a.item_field: "token"})
        text = [c for c in icols if c != a.item_field and itypes[c] in ("token", "token_seq")]
        title = next((c for c in TITLE_FIELDS if c in text), None)
        first_line: dict[str, int] = {}
        for lineno, row in irows:
            key = row[icols[a.item_field]]
            if key in first_line:
                raise PrepareError(f"{item_file}:{lineno}: field {a.item_field!r}: duplicate item id {key!r} (first "
                                   f"defined on line {first_line[key]})")
            first_line[key] = lineno
            if key not in wanted:
                continue
            m, extra = {}, []
            for c in text:
                v = row[icols[c]].strip()
                if not v:
                    continue
                if c == title:
                    m["title"] = v
                elif c in CANONICAL_FIELDS and CANONICAL_FIELDS[c] not in m:
                    m[CANONICAL_FIELDS[c]] = [v] if CANONICAL_FIELDS[c] == "categories" else v
                else:
                    extra.append(f"{c}: {v}")
            if "price" in icols and itypes["price"] == "float" and row[icols["price"]].strip():
                m["price"] = row[icols["price"]].strip()
            if extra:
                m["description"] = ". ".join(([m["description"]] if "description" in m else []) + extra)
            meta[key] = m
        log.info(f"recbole: text from {item_file} columns {text}" + (f", title = {title!r}" if title else ""))
        missing = len(wanted - set(meta))
        if missing:
            log.warning(f"{item_file}: {missing} item(s) of {inter.name} have no row; they are kept without text")
    else:
        log.warning(f"{item_file}: not found; items get no text (an ID-only dataset)")
    items, new_index = [], np.full(len(item_names), -1)
    for k in used:
        new_index[k] = len(items)
        items.append({"item_id": item_names[k], **meta.get(item_names[k], {})})
    return write_dataset(Path(a.out), list(uid), [it["item_id"] for it in items], u, new_index[i], t, items)


# ----------------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="source", required=True)

    def add(name, help_, src=None):
        s = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        s.add_argument("--out", required=True, help="dataset directory to write")
        if src:
            s.add_argument("--src", default=str(SHARED / src), help="source folder")
        return s

    s = add("synthetic", "deterministic products rendered with Pillow and users with latent tastes")
    s.add_argument("--items", type=int, default=200, help="catalogue size")
    s.add_argument("--users", type=int, default=1500, help="number of users")
    s.add_argument("--avg-len", type=float, default=10.0, help="mean interactions per user (minimum 5, cap 50)")
    s.add_argument("--categories", type=int, default=6, help=f"number of categories (at most {len(CATEGORIES)})")
    s.add_argument("--zipf", type=float, default=1.2, help="exponent of the Zipf-like item popularity")
    s.add_argument("--taste", type=float, default=3.0, help="strength of the latent tastes (0 = popularity only)")
    s.add_argument("--companion", type=float, default=0.1, help="chance the next item is the previous one's companion")
    s.add_argument("--new-items", type=float, default=0.2, help="fraction of the catalogue released last: met only "
                   "as validation / test targets, never in training (cold-start items)")
    s.add_argument("--image-size", type=int, default=128, help="side of the rendered product photos in pixels")
    s.add_argument("--no-images", action="store_true", help="skip rendering (for very large benchmark catalogues)")
    s.add_argument("--seed", type=int, default=0, help="everything is a deterministic function of this seed")
    add("beauty", "Amazon 2014 Beauty 5-core (Beauty.txt) with real titles (Beauty_items.tsv)", "amazon")
    add("sports", "Amazon 2014 Sports_and_Outdoors 5-core; ID only, no item text", "amazon")
    s = add("movielens", "MovieLens latest-small with posters", "movielens")
    s.add_argument("--top-items", type=int, default=0, help="keep the N most-rated movies with a poster (0 = all)")
    s.add_argument("--kcore", type=int, default=5, help="iterative k-core on users and items after the filter")
    s.add_argument("--tags", type=int, default=5, help="how many of the most frequent user tags go into the text")
    s.add_argument("--link", action="store_true", help="hard-link posters into images/ instead of copying them "
                   "(copies across file systems)")
    s = add("amazon2023", "raw Amazon Reviews 2023 review + metadata JSONL(.gz)", "amazon")
    s.add_argument("--category", default="All_Beauty", help="with --src: reads CATEGORY.jsonl(.gz), meta_CATEGORY...")
    s.add_argument("--reviews", default=None, help="review JSONL(.gz) file (overrides --src/--category)")
    s.add_argument("--meta", default=None, help="metadata JSONL(.gz) file (overrides --src/--category)")
    s.add_argument("--kcore", type=int, default=5, help="iterative k-core on users and items (0 = none)")
    s.add_argument("--max-description-chars", type=int, default=2000, help="truncate features+description")
    s.add_argument("--no-images", action="store_true", help="do not download images")
    s.add_argument("--image-cache", default=None, help="download cache (default ~/.cache/dmesr/amazon2023_images)")
    s.add_argument("--timeout", type=float, default=10.0, help="seconds per image request")
    s.add_argument("--retries", type=int, default=3, help="retries of a transient failure (timeout, 5xx, 429)")
    s.add_argument("--backoff", type=float, default=0.5, help="first retry delay in seconds; doubles each retry")
    s.add_argument("--workers", type=int, default=8, help="concurrent downloads")
    s = add("recbole", "RecBole atomic files: NAME.inter (+ NAME.item for the item text)")
    s.add_argument("--src", required=True, help="folder holding NAME.inter and, optionally, NAME.item")
    s.add_argument("--name", required=True, help="the dataset's name: reads SRC/NAME.inter, SRC/NAME.item")
    s.add_argument("--kcore", type=int, default=5, help="iterative k-core on users and items (0 = none)")
    s.add_argument("--user-field", default="user_id", help="the .inter field of the user id (RecBole's USER_ID_FIELD)")
    s.add_argument("--item-field", default="item_id", help="the field of the item id (RecBole's ITEM_ID_FIELD)")
    s.add_argument("--time-field", default="timestamp", help="the .inter field that orders each user's rows "
                   "(RecBole's TIME_FIELD; absent = file order)")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    a = parse_args(argv)
    setup_logging(sys.stderr)  # stdout carries the counts line
    t0 = time.time()
    out = Path(a.out)
    build = {"synthetic": build_synthetic, "movielens": build_movielens, "amazon2023": build_amazon2023,
             "recbole": build_recbole,
             "beauty": lambda a: build_seq_file(a, "Beauty", Path(a.src) / "Beauty_items.tsv"),
             "sports": lambda a: build_seq_file(a, "Sports_and_Outdoors", None)}[a.source]
    counts = build(a)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "prepare_config.json",
                  (json.dumps({"argv": sys.argv[1:] if argv is None else list(argv), "args": vars(a),
                               "counts": counts}, indent=2) + "\n",))
    log.info(f"{a.source}: wrote {out} in {time.time() - t0:.1f}s")
    print(json.dumps(counts), flush=True)
    return counts


if __name__ == "__main__":
    try:
        main()
    except PrepareError as e:
        sys.exit(f"error: {e}")
