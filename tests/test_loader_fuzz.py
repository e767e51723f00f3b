"""The dataset loader against files from the wild (property-based, hypothesis).

Each example writes a random valid dataset (ids with commas, quotes, newlines, U+2028, NUL, case variants; integer,
decimal, huge, negative and ISO timestamps; a BOM or not, CRLF or LF, quoted or bare fields, blank lines, long fields),
optionally damages one line of one file, and loads it. Every example must end in exactly the dataset the file
describes, or in one DatasetError naming the file and the damaged line (and the field, where the damage sits in one):
never another exception, never a row silently changed. Budget: 150 + 300 + 300 = 750 examples, derandomized so every
run checks the same cases (about 20 s on one core).
"""
import csv
import io
import json
import os
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common import DatasetError, load_dataset

CLEAN, CSV_DAMAGE, JSONL_DAMAGE = 150, 300, 300
SETTINGS = dict(deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))

SPECIAL = list(',"\n\r\t aAbBéÉ1\u2028\x00\ufeff\\{}')
ids = st.text(st.sampled_from(SPECIAL) | st.characters(codec="utf-8"), min_size=1, max_size=6) \
    .filter(lambda s: s == s.strip())
plain_text = st.none() | st.text(st.characters(codec="utf-8"), max_size=12)
ISO_TZ = st.none() | st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))


@st.composite
def datasets(draw):
    """(items, rows, kind): item objects, interaction rows (user, item id string, timestamp text), timestamp kind."""
    keys = draw(st.lists(ids | st.integers(-10 ** 6, 10 ** 6), min_size=1, max_size=5, unique_by=str))
    if draw(st.booleans()) and isinstance(keys[0], str) and keys[0].swapcase() not in map(str, keys):
        keys.append(keys[0].swapcase())  # 'Ab' and 'aB': two items, ids are case-sensitive
    items = []
    for k in keys:
        obj = {"item_id": k, "title": draw(plain_text)}
        if draw(st.booleans()):
            obj["categories"] = draw(st.lists(st.text(max_size=5), max_size=3))
        if draw(st.booleans()):
            obj["price"] = draw(st.floats(allow_nan=False, allow_infinity=False) | st.integers() | st.text(max_size=4))
        if draw(st.integers(0, 9)) == 0:
            obj["description"] = "long " * 40_000  # a 200 kB field
        if draw(st.booleans()):
            obj["extra"] = draw(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))  # unknown: kept
        items.append(obj)
    kind = draw(st.sampled_from(["number", "date"]))
    if kind == "number":
        stamp = st.integers(-2 ** 63 + 1, 2 ** 63 - 1).map(str) | st.integers(2 ** 60, 2 ** 60 + 3).map(str) \
            | st.integers(-3, 3).map(str) | st.floats(allow_nan=False, allow_infinity=False).map(repr)
    else:
        stamp = st.builds(lambda d, tz, sep: d.replace(tzinfo=tz).isoformat(sep=sep), st.datetimes(), ISO_TZ,
                          st.sampled_from(["T", " "]))
    users = draw(st.lists(ids, min_size=1, max_size=4, unique=True))
    rows = draw(st.lists(st.tuples(st.sampled_from(users), st.sampled_from([str(k) for k in keys]), stamp),
                         min_size=1, max_size=12))
    return items, rows, kind


def sort_key(ts: str, kind: str):
    """The order a timestamp means, computed independently of the loader (Python compares int, float and aware
    datetimes exactly)."""
    if kind == "date":
        d = datetime.fromisoformat(ts)
        return d if d.tzinfo else d.replace(tzinfo=timezone.utc)
    return int(ts) if ts.lstrip("-").isdigit() else float(ts)


def expected(items, rows, kind):
    users = list(dict.fromkeys(u for u, _, _ in rows))
    by_user = {u: sorted([r for r in rows if r[0] == u], key=lambda r: sort_key(r[2], kind)) for u in users}
    return [str(o["item_id"]) for o in items], items, users, [[i for _, i, _ in by_user[u]] for u in users]


def loaded(ds):
    return ds.item_ids, ds.items, ds.user_ids, [[ds.item_ids[i - 1] for i in s] for s in ds.seqs]


def csv_field(v: str, quote_all: bool) -> str:
    if quote_all or any(c in v for c in ',"\r\n') or v != v.strip():
        return '"' + v.replace('"', '""') + '"'
    return v


class Files:
    """A dataset written with random formatting, remembering the line each record starts on."""

    def __init__(self, draw, items, rows):
        self.eol = draw(st.sampled_from(["\n", "\r\n"]))
        self.bom = draw(st.booleans())
        self.quote_all = draw(st.booleans())
        self.item_lines = [json.dumps(o, ensure_ascii=draw(st.booleans())) for o in items]
        self.blank = [draw(st.integers(0, 9)) == 0 for _ in items]  # a blank line before some items
        self.rows = [[u, i, t] for u, i, t in rows]
        self.header = "user_id,item_id,timestamp"

    def jsonl(self) -> tuple[bytes, list[int]]:
        out, where, n = [], [], 0
        for line, blank in zip(self.item_lines, self.blank):
            if blank:
                out.append(b"")
                n += 1
            out.append(line.encode("utf-8", errors="surrogateescape") if isinstance(line, str) else line)
            n += 1
            where.append(n)
        data = b"".join(x + self.eol.encode() for x in out)
        return (b"\xef\xbb\xbf" if self.bom else b"") + data, where

    def csv(self) -> tuple[bytes, list[int]]:
        text, where = self.header + self.eol, []
        for r in self.rows:
            where.append(len(io.StringIO(text, newline="").readlines()) + 1)  # csv counts \r, \n and \r\n as line ends
            text += (",".join(csv_field(v, self.quote_all) for v in r) if isinstance(r, list) else r) + self.eol
        return (b"\xef\xbb\xbf" if self.bom else b"") + text.encode("utf-8", errors="surrogateescape"), where


def load(files: Files, root: Path, jsonl: bytes | None = None, csv_bytes: bytes | None = None):
    (root / "items.jsonl").write_bytes(files.jsonl()[0] if jsonl is None else jsonl)
    (root / "interactions.csv").write_bytes(files.csv()[0] if csv_bytes is None else csv_bytes)
    return load_dataset(root, check_images=False)


def assert_error(root, name, line, *fragments, call):
    """The load raises one DatasetError that starts with 'DIR/name:line: ' and contains every fragment."""
    with pytest.raises(DatasetError) as e:
        call()
    msg = str(e.value)
    assert msg.startswith(f"{root / name}:{line}: "), msg[:300]
    for frag in fragments:
        assert frag in msg, (frag, msg[:300])


@settings(max_examples=CLEAN, **SETTINGS)
@given(st.data())
def test_any_valid_file_loads_to_exactly_what_it_says(data):
    items, rows, kind = data.draw(datasets())
    files = Files(data.draw, items, rows)
    with tempfile.TemporaryDirectory() as d:
        assert loaded(load(files, Path(d))) == expected(items, rows, kind)


BAD_STAMPS = ["nan", "NaN", "inf", "-Infinity", "1e400", "abc", "", "12:30", "1_000", "\u0661\u0662", "0x10", "1,5",
              str(2 ** 63), "9" * 30, "2024-13-01", "1 2"]


@settings(max_examples=CSV_DAMAGE, **SETTINGS)
@given(st.data())
def test_damaged_interactions_csv_fails_at_the_damaged_line(data):
    items, rows, kind = data.draw(datasets())
    files = Files(data.draw, items, rows)
    damage = data.draw(st.sampled_from(["utf8", "missing_field", "extra_field", "header_only", "empty", "timestamp",
                                        "other_kind", "space_user", "space_item", "unknown_item", "unclosed_quote",
                                        "text_after_quote", "huge_field", "header"]))
    k = data.draw(st.integers(0, len(rows) - 1))
    row = files.rows[k]
    fields = ["user_id", "item_id", "timestamp"]
    line = files.csv()[1][k]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        def err(ln, *frag):
            assert_error(root, "interactions.csv", ln, *frag, call=lambda: load(files, root))
        if damage == "utf8":
            j = data.draw(st.integers(0, 2))
            pos = data.draw(st.integers(0, len(row[j])))
            row[j] = row[j][:pos] + "\udcff" + row[j][pos:]  # written back as the byte 0xff
            err(line, f"field '{fields[j]}'", "UTF-8")
        elif damage == "missing_field":
            del row[data.draw(st.integers(0, 2))]
            err(line, "field 'timestamp' is missing", "got 2")
        elif damage == "extra_field":
            row.append(data.draw(st.text(max_size=3)))
            err(line, "extra field", "got 4")
        elif damage == "header_only":
            files.rows = []
            err(2, "no interactions")
        elif damage == "empty":
            assert_error(root, "interactions.csv", 1, "header", call=lambda: load(files, root, csv_bytes=b""))
        elif damage == "timestamp":
            row[2] = data.draw(st.sampled_from(BAD_STAMPS))
            err(line, "field 'timestamp'")
        elif damage == "other_kind":
            row[2] = "2024-01-02T03:04:05" if kind == "number" else "1700000000"
            first = files.csv()[1][0]
            if k == 0 and len(rows) > 1:
                err(files.csv()[1][1], "field 'timestamp'", f"line {first}")
            elif k > 0:
                err(line, "field 'timestamp'", f"line {first}")
            else:  # a one-row file of the other kind is simply valid
                rows[0] = tuple(row)
                assert loaded(load(files, root)) == expected(items, rows, "date" if kind == "number" else "number")
        elif damage in ("space_user", "space_item"):
            j = 0 if damage == "space_user" else 1
            row[j] = data.draw(st.sampled_from([" ", "\t", "\u00a0"])) + row[j] if data.draw(st.booleans()) \
                else row[j] + " "
            err(min(files.csv()[1][x] for x, r in enumerate(files.rows) if r[j] != r[j].strip()),
                f"field '{fields[j]}'", "whitespace")
        elif damage == "unknown_item":
            new = data.draw(ids.filter(lambda s: s not in {str(o["item_id"]) for o in items}))
            row[1] = new
            err(line, "field 'item_id'", "unknown item id", "1 row(s)")
        elif damage == "unclosed_quote":
            files.rows[k] = '"' + ",".join(csv_field(v, False) for v in row)  # a quote opened and never closed
            with pytest.raises(DatasetError) as e:
                load(files, root)
            assert str(e.value).startswith(f"{root / 'interactions.csv'}:{line}: "), str(e.value)[:300]
        elif damage == "text_after_quote":
            files.rows[k] = ",".join(['"' + row[0].replace('"', '""') + '"x', csv_field(row[1], False), row[2]])
            err(line, "not valid CSV")
        elif damage == "huge_field":
            row[0] = "u" * 200_000  # beyond csv's field limit: refused, not truncated
            err(line, "not valid CSV", "field larger than field limit")
        elif damage == "header":
            files.header = data.draw(st.sampled_from(["user,item,time", "item_id,user_id,timestamp", "user_id,item_id",
                                                      ""]))
            err(1, "header must be 'user_id,item_id,timestamp'")


WRONG_TYPES = {"item_id": [1.5, True, None, [], {}, ""], "title": [1, [], {}, True], "brand": [2.0, ["x"]],
               "description": [{}, 3], "categories": [{}, 1, [1, 2], [None]], "price": [True, [], {}, None],
               "image": [1, [], {"path": "x"}]}


@settings(max_examples=JSONL_DAMAGE, **SETTINGS)
@given(st.data())
def test_damaged_items_jsonl_fails_at_the_damaged_line(data):
    items, rows, kind = data.draw(datasets())
    files = Files(data.draw, items, rows)
    damage = data.draw(st.sampled_from(["utf8_value", "utf8_syntax", "lone_surrogate", "not_json", "not_object",
                                        "wrong_type", "duplicate_key", "duplicate_id", "space_id", "empty",
                                        "image_escape", "image_symlink_out", "image_inside", "deep"]))
    k = data.draw(st.integers(0, len(items) - 1))
    obj = dict(items[k])
    line = files.jsonl()[1][k]
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory() as outside:
        root = Path(d)
        def err(ln, *frag):
            assert_error(root, "items.jsonl", ln, *frag, call=lambda: load(files, root))
        if damage == "utf8_value":
            obj["title"] = "caf\udce9"  # Latin-1 'é' inside a UTF-8 file
            files.item_lines[k] = json.dumps(obj, ensure_ascii=False)
            err(line, "field 'title'", "UTF-8")
        elif damage == "utf8_syntax":
            files.item_lines[k] = b"\xff" + json.dumps(obj).encode()
            err(line, "not valid UTF-8", "column 1")
        elif damage == "lone_surrogate":
            files.item_lines[k] = json.dumps(obj)[:-1] + ', "brand": "x\\ud83d"}'
            err(line, "field 'brand'")
        elif damage == "not_json":
            files.item_lines[k] = data.draw(st.sampled_from(["{'item_id': 'a'}", json.dumps(obj)[:-1], "item_id=a",
                                                             json.dumps(obj) + "}", "{"]))
            err(line, "not valid JSON")
        elif damage == "not_object":
            files.item_lines[k] = json.dumps(data.draw(st.sampled_from([[obj], "a", 3, None, True])))
            err(line, "expected a JSON object")
        elif damage == "wrong_type":
            field = data.draw(st.sampled_from(sorted(WRONG_TYPES)))
            value = data.draw(st.sampled_from(WRONG_TYPES[field]))
            obj[field] = value
            files.item_lines[k] = json.dumps(obj)
            if value is None and field == "price":  # null is "absent": valid
                items[k] = obj
                assert loaded(load(files, root)) == expected(items, rows, kind)
            else:
                err(line, f"field '{field}'")
        elif damage == "duplicate_key":
            files.item_lines[k] = json.dumps(obj)[:-1] + ', "item_id": "again"}'
            err(line, "field 'item_id'", "twice")
        elif damage == "duplicate_id":
            j = data.draw(st.integers(0, len(items) - 1))
            files.item_lines.append(json.dumps({"item_id": str(items[j]["item_id"]), "title": "again"}))
            files.blank.append(False)
            err(files.jsonl()[1][-1], "field 'item_id'", "duplicate", f"line {files.jsonl()[1][j]}")
        elif damage == "space_id":
            obj["item_id"] = data.draw(st.sampled_from([" ", "\t", "\u3000"])) + str(obj["item_id"])
            files.item_lines[k] = json.dumps(obj)
            err(line, "field 'item_id'", "whitespace")
        elif damage == "empty":
            assert_error(root, "items.jsonl", 1, "no items", call=lambda: load(files, root, jsonl=b""))
        elif damage == "image_escape":
            obj["image"] = data.draw(st.sampled_from(["../../etc/passwd", "/etc/passwd", "images/../../x.png",
                                                      str(Path(outside) / "x.png"), "..", "/"]))
            files.item_lines[k] = json.dumps(obj)
            err(line, "field 'image'", "outside the dataset directory")
        elif damage == "image_symlink_out":
            (Path(outside) / "secret.png").write_bytes(b"not yours")
            (root / "images").mkdir()
            os.symlink(Path(outside) / "secret.png", root / "images" / "x.png")
            obj["image"] = "images/x.png"
            files.item_lines[k] = json.dumps(obj)
            err(line, "field 'image'", "outside the dataset directory")
        elif damage == "image_inside":  # missing, a directory, a name too long: counted, the item is kept
            (root / "images").mkdir()
            obj["image"] = data.draw(st.sampled_from(["images/none.png", "images", "images/" + "n" * 300 + ".png",
                                                      "./images/../images/none.png"]))
            files.item_lines[k] = json.dumps(obj)
            items[k] = obj
            ds = load(files, root)
            assert loaded(ds) == expected(items, rows, kind)
            assert ds.images[k] is None and ds.report["images_missing"] == 1
        elif damage == "deep":
            files.item_lines[k] = "[" * 100_000 + "]" * 100_000
            err(line, "not valid JSON")
