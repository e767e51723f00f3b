"""data/prepare.py: the synthetic generator, the converters on tiny hand-made source files, the image downloader
against a real HTTP server on loopback, and (marked slow) the exact counts on the real data in ../shared/data."""
import csv
import gzip
import http.server
import io
import json
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, SHARED_DATA, run_script
from common import load_dataset

sys.path.insert(0, str(ROOT / "data"))
import prepare  # noqa: E402


def prep(*args):
    """Run the converter as a user would; return the one JSON line it prints."""
    p = run_script("data/prepare.py", *args)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, f"expected one JSON line on stdout, got {p.stdout!r}"
    return json.loads(lines[0])


def counts_of(ds):
    return {k: ds.report[k] for k in ("users", "items", "interactions", "items_with_image")}


def png_bytes(colour=(200, 30, 30), size=(12, 10)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


# ---- synthetic ----

def test_synthetic_is_deterministic_and_every_item_has_a_readable_image(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    small = ["--items", "40", "--users", "120", "--image-size", "48"]
    ca = prep("synthetic", "--out", a, *small)
    cb = prep("synthetic", "--out", b, *small)
    prep("synthetic", "--out", c, *small, "--seed", "1")
    for name in ("interactions.csv", "items.jsonl", "synthetic_attributes.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert sorted(p.name for p in (a / "images").iterdir()) == sorted(p.name for p in (b / "images").iterdir())
    assert all(p.read_bytes() == (b / "images" / p.name).read_bytes() for p in (a / "images").iterdir())
    assert (a / "interactions.csv").read_bytes() != (c / "interactions.csv").read_bytes()  # the seed matters

    ds = load_dataset(a)
    assert counts_of(ds) == ca == cb
    assert ca["items"] == 40 and ca["users"] == 120 and ca["items_with_image"] == 40
    assert ds.report["images_unreadable"] == ds.report["images_missing"] == ds.report["items_without_text"] == 0
    assert min(len(s) for s in ds.seqs) >= 5
    cfg = json.loads((a / "prepare_config.json").read_text())
    assert cfg["args"]["items"] == 40 and cfg["argv"][0] == "synthetic" and cfg["counts"] == ca


def test_synthetic_catalogue_does_not_depend_on_the_user_side_flags(tmp_path):
    """Item text, images and attributes are a function of --seed and the item flags: user-side variants of a dataset
    (fewer users, longer histories, stronger tastes) share one stage-1 run."""
    a, b = tmp_path / "a", tmp_path / "b"
    prep("synthetic", "--out", a, "--items", "40", "--users", "120", "--image-size", "48")
    prep("synthetic", "--out", b, "--items", "40", "--users", "60", "--avg-len", "7", "--taste", "5", "--zipf", "0.8",
         "--image-size", "48")
    for name in ("items.jsonl", "synthetic_attributes.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert all(p.read_bytes() == (b / "images" / p.name).read_bytes() for p in (a / "images").iterdir())
    assert (a / "interactions.csv").read_bytes() != (b / "interactions.csv").read_bytes()


def test_synthetic_attributes_live_where_they_should(tmp_path):
    """Shape, colour and pattern only in the image; brand and price band only in the text; category in both."""
    d = tmp_path / "s"
    prep("synthetic", "--out", d, "--items", "60", "--users", "60", "--image-size", "64")
    ds = load_dataset(d)
    truth = {r["item_id"]: r for r in csv.DictReader(open(d / "synthetic_attributes.csv"))}
    words = set(prepare.COLOURS) | set(prepare.SHAPES) | set(prepare.PATTERNS) - {"plain"}
    cat_bg = {name: bg for (name, _), bg in zip(prepare.CATEGORIES, prepare.CAT_BACKGROUND)}
    for iid, text, img in zip(ds.item_ids, ds.texts(), ds.images):
        t = truth[iid]
        assert not words & set(text.lower().replace(".", " ").replace(",", " ").split()), text
        assert t["brand"] in text and t["price_band"] in text and t["category"] in text
        im = np.asarray(Image.open(img).convert("RGB"))
        assert tuple(im[1, 1]) == cat_bg[t["category"]]  # the category is the background
        rgb = np.array(prepare.COLOURS[t["colour"]])
        assert (np.abs(im.astype(int) - rgb).sum(-1) == 0).sum() > 0.015 * im.shape[0] * im.shape[1]


def _truth(d):
    items = {r["item_id"]: r for r in csv.DictReader(open(d / "synthetic_attributes.csv"))}
    users = {r["user_id"]: r for r in csv.DictReader(open(d / "synthetic_users.csv"))}
    return items, users


def test_synthetic_users_follow_their_latent_tastes(tmp_path):
    """Against a --taste 0 control (popularity and category only), each user's interactions match their latent
    taste in every image-only and text-only attribute far more often."""
    rate = {}
    for taste in ("3", "0"):
        d = tmp_path / taste
        prep("synthetic", "--out", d, "--no-images", "--taste", taste)
        ds, (items, users) = load_dataset(d, check_images=False), _truth(d)
        rate[taste] = {a: np.mean([items[ds.item_ids[i - 1]][a] == users[u][a] for u, s in zip(ds.user_ids, ds.seqs)
                                   for i in s]) for a in ("colour", "shape", "pattern", "brand", "price_band")}
    for a in rate["3"]:
        assert rate["3"][a] > 1.6 * rate["0"][a], (a, rate)


def _tail_hr10(ds, items, attrs, pop, tail):
    """HR@10 on tail test items of a scorer that knows only `attrs` of each item and the user's history."""
    vals = {a: np.array([items[k][a] for k in ds.item_ids]) for a in attrs}
    hits = []
    for s in ds.seqs:
        hist, target = s[:-1], s[-1]
        if not tail[target]:
            continue
        score = np.log(pop + 1)
        for a in attrs:  # log-likelihood of the item's value under the history's (smoothed) value frequencies
            seen = Counter(vals[a][hist - 1])
            score[1:] += np.log((np.array([seen[v] for v in vals[a]]) + 0.5) / (len(hist) + 0.5 * len(set(vals[a]))))
        score[0], score[hist] = -np.inf, -np.inf
        hits.append((score > score[target]).sum() < 10)
    return float(np.mean(hits))


def test_synthetic_content_predicts_tail_items(tmp_path):
    """What the dataset is for: knowing only an item's image attributes, or only its text attributes, finds the
    rarely-bought items a user takes next far better than knowing its category (visible in both) alone."""
    d = tmp_path / "default"
    prep("synthetic", "--out", d, "--no-images")
    ds, (items, _) = load_dataset(d, check_images=False), _truth(d)
    train, _ = ds.split()
    pop = np.bincount(np.concatenate(train), minlength=ds.n_items + 1).astype(float)
    tail = np.zeros(ds.n_items + 1, dtype=bool)
    tail[1 + np.argsort(-pop[1:])[ds.n_items // 5:]] = True  # all but the 20% most popular items
    category = _tail_hr10(ds, items, ["category"], pop, tail)
    assert _tail_hr10(ds, items, ["category", "colour", "shape", "pattern"], pop, tail) > 1.5 * category
    assert _tail_hr10(ds, items, ["category", "brand", "price_band"], pop, tail) > 1.5 * category


def test_synthetic_popularity_has_a_long_tail(tmp_path):
    d = tmp_path / "z"
    prep("synthetic", "--out", d, "--no-images")
    ds = load_dataset(d, check_images=False)
    counts = np.sort(np.bincount(np.concatenate(ds.seqs), minlength=ds.n_items + 1)[1:])[::-1]
    head = counts[: ds.n_items // 10].sum() / counts.sum()
    assert head > 0.25  # the top 10% of items carry far more than 10% of the interactions
    assert (counts > 0).mean() > 0.9  # ... yet almost every item is bought by someone


def test_synthetic_large_catalogue_in_user_chunks(tmp_path, monkeypatch):
    """The chunked path used at 1M users, exercised with tiny chunks in-process."""
    monkeypatch.setattr(prepare, "USER_CHUNK", 7)
    d = tmp_path / "big"
    counts = prepare.main(["synthetic", "--out", str(d), "--items", "3000", "--users", "50", "--no-images"])
    ds = load_dataset(d, check_images=False)
    assert counts_of(ds) == counts and counts["items_with_image"] == 0
    assert all(len(set(s.tolist())) >= len(s) - 1 for s in ds.seqs)  # (almost) no repeat purchases


# ---- beauty / sports (standard split files) ----

def write_seq_source(src, name, lines, titles=None):
    src.mkdir(parents=True, exist_ok=True)
    (src / f"{name}.txt").write_text("".join(line + "\n" for line in lines))
    if titles is not None:
        (src / f"{name}_items.tsv").write_text("item_id\tasin\ttitle\n" +
                                               "".join(f"{k}\tB{k:04d}\t{t}\n" for k, t in titles.items()))


def test_beauty_converter_on_fixture(tmp_path):
    src = tmp_path / "amazon"
    write_seq_source(src, "Beauty", ["1 3 1 2", "2 2 10 3", "3 10 1 1"],
                     {1: "Lipstick, red", 2: "Nail polish", 3: 'Shampoo "extra"', 10: "Comb"})
    counts = prep("beauty", "--src", src, "--out", tmp_path / "b")
    assert counts == {"users": 3, "items": 4, "interactions": 9, "items_with_image": 0}
    ds = load_dataset(tmp_path / "b")
    name = {k + 1: v for k, v in enumerate(ds.item_ids)}
    assert {u: [name[i] for i in s] for u, s in zip(ds.user_ids, ds.seqs)} == \
        {"1": ["3", "1", "2"], "2": ["2", "10", "3"], "3": ["10", "1", "1"]}  # file order is time order
    assert dict(zip(ds.item_ids, ds.texts()))["1"] == "Lipstick, red"
    assert dict(zip(ds.item_ids, ds.texts()))["3"] == 'Shampoo "extra"'


def test_beauty_converter_reports_bad_input(tmp_path):
    src = tmp_path / "amazon"
    write_seq_source(src, "Beauty", ["1 1 2", "2 2 7"], {1: "a", 2: "b"})
    p = run_script("data/prepare.py", "beauty", "--src", src, "--out", tmp_path / "b", check=False)
    assert p.returncode != 0 and "Beauty_items.tsv" in p.stderr and "'7'" in p.stderr and "Traceback" not in p.stderr
    write_seq_source(src, "Beauty", ["1 1 2", "2"], {1: "a", 2: "b"})
    p = run_script("data/prepare.py", "beauty", "--src", src, "--out", tmp_path / "b", check=False)
    assert p.returncode != 0 and "Beauty.txt:2:" in p.stderr and "Traceback" not in p.stderr


def test_sports_is_id_only(tmp_path):
    src = tmp_path / "amazon"
    write_seq_source(src, "Sports_and_Outdoors", ["7 1 2 3", "8 3 2 11 1"])
    counts = prep("sports", "--src", src, "--out", tmp_path / "s")
    assert counts == {"users": 2, "items": 4, "interactions": 7, "items_with_image": 0}
    assert [json.loads(line) for line in open(tmp_path / "s" / "items.jsonl")] == \
        [{"item_id": "1"}, {"item_id": "2"}, {"item_id": "3"}, {"item_id": "11"}]
    assert load_dataset(tmp_path / "s").report["items_without_text"] == 4


# ---- movielens ----

def write_movielens(src):
    """8 users x 7 movies; movie 7 has no poster, movie 6 is rated by 2 users only."""
    (src / "posters").mkdir(parents=True)
    for m in range(1, 7):
        Image.new("RGB", (18, 27), (40 * m, 20, 200 - 20 * m)).save(src / "posters" / f"{m}.jpg")
    ratings = ["userId,movieId,rating,timestamp"]
    rng = np.random.default_rng(0)
    for u in range(1, 9):
        movies = [1, 2, 3, 4, 5, 7] + ([6] if u <= 2 else [])
        for m in movies:
            ratings.append(f"{u},{m},{rng.integers(1, 6)}.0,{int(rng.integers(1_000, 2_000))}")
    (src / "ratings.csv").write_text("\n".join(ratings) + "\n")
    (src / "movies.csv").write_text('movieId,title,genres\n1,"Heat, the Sequel (1999)",Action|Crime\n'
                                    "2,Toy (1995),Animation|Children\n3,Three (2001),Drama\n4,Four (2002),Comedy\n"
                                    "5,Five (2003),(no genres listed)\n6,Six (2004),Horror\n7,Seven (2005),Drama\n")
    (src / "tags.csv").write_text("userId,movieId,tag,timestamp\n1,1,heist,1\n2,1,Heist,2\n3,1,pacino,3\n"
                                  "4,1,heist,4\n5,1,pacino,5\n6,1,long,6\n1,2,pixar,7\n")
    return src


def test_movielens_converter_on_fixture(tmp_path):
    src = write_movielens(tmp_path / "ml")
    counts = prep("movielens", "--src", src, "--out", tmp_path / "m")
    # movie 7 (no poster) goes first; movie 6 then fails the 5-core
    assert counts == {"users": 8, "items": 5, "interactions": 40, "items_with_image": 5}
    ds = load_dataset(tmp_path / "m")
    assert ds.item_ids == ["1", "2", "3", "4", "5"] and ds.report["images_unreadable"] == 0
    text = dict(zip(ds.item_ids, ds.texts()))
    assert text["1"] == "Heat, the Sequel (1999). Categories: Action, Crime. Tags: heist, pacino, long"
    assert text["5"] == "Five (2003)"
    rows = list(csv.DictReader(open(src / "ratings.csv")))
    t = {(r["userId"], r["movieId"]): int(r["timestamp"]) for r in rows}
    for u, s in zip(ds.user_ids, ds.seqs):
        stamps = [t[(u, ds.item_ids[i - 1])] for i in s]
        assert stamps == sorted(stamps)  # ratings ordered by timestamp

    counts = prep("movielens", "--src", src, "--out", tmp_path / "top", "--top-items", "3", "--kcore", "3")
    ds = load_dataset(tmp_path / "top")
    assert counts["items"] == 3 == counts["items_with_image"] and counts["users"] == 8
    n_ratings = Counter(r["movieId"] for r in rows)
    kept = sorted(ds.item_ids, key=int)
    assert all(n_ratings[k] >= n_ratings[m] for k in kept for m in ("1", "2", "3", "4", "5", "6") if m not in kept)


def test_movielens_bad_rows_name_file_line_and_field(tmp_path):
    src = write_movielens(tmp_path / "ml")
    good = (src / "ratings.csv").read_text()
    for bad, field in [("3,x9,4.0,1500", "movieId"), ("3,1,4.0,noon", "timestamp"), ("3,1,4.0", "fields")]:
        (src / "ratings.csv").write_text(good + bad + "\n")
        p = run_script("data/prepare.py", "movielens", "--src", src, "--out", tmp_path / "m", check=False)
        line = len(good.splitlines()) + 1
        assert p.returncode != 0 and f"ratings.csv:{line}:" in p.stderr and field in p.stderr, p.stderr
        assert "Traceback" not in p.stderr


# ---- amazon2023: the downloader against a real HTTP server on loopback ----

class _Handler(http.server.BaseHTTPRequestHandler):
    hits: Counter = Counter()

    def do_GET(self):
        _Handler.hits[self.path] += 1
        if self.path.startswith("/good"):
            body, code = png_bytes((10 * len(self.path), 120, 30)), 200
        elif self.path == "/corrupt.jpg":
            body, code = b"\xff\xd8\xff\xe0 truncated jpeg, not an image", 200
        elif self.path == "/slow.jpg":
            time.sleep(1.5)  # longer than the client's timeout, and bounded so the server can always stop
            body, code = png_bytes(), 200
        elif self.path == "/truncated.png":  # promises more bytes than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", "5000")
            self.end_headers()
            self.wfile.write(png_bytes()[:50])
            self.close_connection = True
            return
        elif self.path == "/flaky.png" and _Handler.hits[self.path] == 1:
            body, code = b"busy", 503
        elif self.path == "/flaky.png":
            body, code = png_bytes((1, 2, 3)), 200
        else:
            body, code = b"not here", 404
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on the slow reply
            pass

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    _Handler.hits = Counter()
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    th = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    th.join(timeout=5)


def test_downloader_against_loopback_server(tmp_path, server):
    jobs = [("g1", f"{server}/good1.png"), ("g1b", f"{server}/good1.png"), ("g2", f"{server}/good22.png"), ("nf", f"{server}/missing.jpg"),
            ("bad", f"{server}/corrupt.jpg"), ("slow", f"{server}/slow.jpg"), ("flaky", f"{server}/flaky.png"),
            ("cut", f"{server}/truncated.png")]
    out, cache = tmp_path / "out", tmp_path / "cache"
    t0 = time.monotonic()
    ok, failures = prepare.download_images(jobs, out, cache, timeout=0.4, retries=2, backoff=0.05, workers=4)
    assert time.monotonic() - t0 < 10  # the slow reply costs timeouts, not the server's full delay per attempt
    assert ok == {"g1": "images/g1.png", "g1b": "images/g1b.png", "g2": "images/g2.png", "flaky": "images/flaky.png"}
    assert np.asarray(Image.open(out / "images" / "g2.png"))[0, 0].tolist() == [10 * len("/good22.png"), 120, 30]
    reasons = {f["item_id"]: f["reason"] for f in failures}
    assert set(reasons) == {"nf", "bad", "slow", "cut"} and all(f["url"].startswith(server) for f in failures)
    assert reasons["nf"] == "HTTP 404" and _Handler.hits["/missing.jpg"] == 1  # a 404 is not retried
    assert reasons["bad"].startswith("corrupt image")
    assert reasons["slow"] == "timeout (after 3 attempts)" and _Handler.hits["/slow.jpg"] == 3
    assert _Handler.hits["/flaky.png"] == 2  # a 503 is retried, then succeeds
    assert reasons["cut"].startswith("ConnectionError: truncated reply") and _Handler.hits["/truncated.png"] == 3

    # a second run is served from the cache: no new request for what already succeeded
    before = sum(_Handler.hits[p] for p in ("/good1.png", "/good22.png", "/flaky.png"))
    ok2, _ = prepare.download_images([j for j in jobs if j[0] in ok], tmp_path / "out2", cache, timeout=0.4, retries=0)
    assert ok2 == ok
    assert sum(_Handler.hits[p] for p in ("/good1.png", "/good22.png", "/flaky.png")) == before
    assert not list(cache.glob("*.part*"))  # no half-downloaded leftovers


def write_amazon2023(src, base):
    src.mkdir(parents=True)
    reviews = []
    for u in range(4):
        for k, item in enumerate(["P1", "P2", "P3"]):
            reviews.append({"rating": 5.0, "title": "ok", "text": "fine", "asin": item + "-var", "parent_asin": item,
                            "user_id": f"U{u}", "timestamp": 1_600_000_000_000 + 1000 * (3 - k) + u})
    reviews.append({"user_id": "U0", "parent_asin": "P1", "asin": "P1", "timestamp": 1_700_000_000_000})  # repeat
    reviews.append({"user_id": "U9", "parent_asin": "P4", "asin": "P4", "timestamp": 1_600_000_000_000})  # k-core
    with gzip.open(src / "Toy_Store.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in reviews))
    meta = [{"parent_asin": "P1", "title": "Red Ball", "store": "Acme", "price": 9.99, "main_category": "Toys",
             "categories": [], "features": ["Bouncy", "Round"], "description": ["A ball."],
             "images": [{"variant": "PT01", "large": f"{base}/missing.jpg"},
                        {"variant": "MAIN", "large": f"{base}/good-p1.png", "thumb": f"{base}/x"}]},
            {"parent_asin": "P2", "title": "Kite", "store": "", "price": None, "categories": ["Toys", "Outdoor"],
             "features": [], "description": [], "images": [{"variant": "MAIN", "large": f"{base}/missing.jpg"}]},
            {"parent_asin": "P3", "title": "Yo-yo", "price": "None", "images": []},
            {"parent_asin": "P4", "title": "Never kept", "images": [{"variant": "MAIN", "large": f"{base}/good4.png"}]}]
    with gzip.open(src / "meta_Toy_Store.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(m) + "\n" for m in meta))


def test_amazon2023_converter_on_fixture(tmp_path, server):
    src = tmp_path / "raw"
    write_amazon2023(src, server)
    out = tmp_path / "a23"
    counts = prep("amazon2023", "--src", src, "--category", "Toy_Store", "--out", out, "--kcore", "2",
                  "--image-cache", tmp_path / "cache", "--timeout", "2", "--retries", "1", "--backoff", "0.01")
    assert counts == {"users": 4, "items": 3, "interactions": 12, "items_with_image": 1}
    ds = load_dataset(out)
    text = dict(zip(ds.item_ids, ds.texts()))
    assert text == {"P1": "Red Ball. Brand: Acme. Categories: Toys. Price: 9.99. Bouncy Round A ball",
                    "P2": "Kite. Categories: Toys, Outdoor", "P3": "Yo-yo"}  # P2's image failed: it keeps its text
    assert ds.images[ds.item_ids.index("P1")] is not None and ds.report["images_unreadable"] == 0
    assert [json.loads(line)["item_id"] for line in open(out / "image_failures.jsonl")] == ["P2"]
    assert _Handler.hits["/good4.png"] == 0  # items removed by the k-core are never downloaded
    # reviews are in reverse order of time in the file: the sequences must not be
    assert all([ds.item_ids[i - 1] for i in s] == ["P3", "P2", "P1"] for s in ds.seqs)


def test_amazon2023_bad_json_names_the_line(tmp_path):
    src = tmp_path / "raw"
    src.mkdir()
    (src / "X.jsonl").write_text('{"user_id": "u", "parent_asin": "p", "timestamp": 1}\n{"user_id": \n')
    (src / "meta_X.jsonl").write_text("")
    p = run_script("data/prepare.py", "amazon2023", "--src", src, "--category", "X", "--out", tmp_path / "o",
                   check=False)
    assert p.returncode != 0 and "X.jsonl:2:" in p.stderr and "not valid JSON" in p.stderr


def test_ids_with_commas_and_quotes_round_trip(tmp_path):
    items = [{"item_id": 'a,"b"', "title": "x"}, {"item_id": "c", "title": "y"}]
    counts = prepare.write_dataset(tmp_path / "q", ["user,1"], [it["item_id"] for it in items],
                                   [0, 0, 0], [1, 0, 1], [3, 1, 2], items)
    ds = load_dataset(tmp_path / "q")
    assert counts_of(ds) == counts and ds.user_ids == ["user,1"] and ds.seqs[0].tolist() == [1, 2, 2]


# ---- real data (../shared/data): exact counts ----

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not present at {SHARED_DATA}")


@pytest.mark.slow
@needs_shared
def test_real_beauty_counts(tmp_path):
    counts = prep("beauty", "--src", SHARED_DATA / "amazon", "--out", tmp_path / "beauty")
    assert counts == {"users": 22363, "items": 12101, "interactions": 198502, "items_with_image": 0}
    assert counts_of(load_dataset(tmp_path / "beauty")) == counts


@pytest.mark.slow
@needs_shared
def test_real_movielens_top300(tmp_path):
    counts = prep("movielens", "--src", SHARED_DATA / "movielens", "--top-items", "300", "--out", tmp_path / "ml300")
    assert counts["items"] == 300 == counts["items_with_image"] and counts["users"] >= 550
    ds = load_dataset(tmp_path / "ml300")
    assert counts_of(ds) == counts and ds.report["images_unreadable"] == 0
    assert min(len(s) for s in ds.seqs) >= 5


def test_synthetic_new_items_are_met_only_as_validation_or_test_targets(tmp_path):
    d = tmp_path / "n"
    prep("synthetic", "--out", d, "--items", "60", "--users", "300", "--new-items", "0.25", "--no-images")
    ds = load_dataset(d)
    train_seqs, users = ds.split()
    in_train = set(np.concatenate(train_seqs).tolist())
    never = set(range(1, ds.n_items + 1)) - in_train
    late = {int(ds.seqs[u][k]) for u in users for k in (-1, -2)}
    assert len(never) == 15 and never <= late  # a quarter of the catalogue, all met at the last two steps only
