"""data/prepare.py recbole: RecBole atomic files (written here in RecBole's documented format: tab-separated, typed
`name:type` headers) become the canonical directory; columns are found by name; counts match a hand count."""
import json
import sys

import pytest

from common import load_dataset
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "data"))
import prepare  # noqa: E402

# Columns deliberately not in RecBole's usual order, an extra rating column, float timestamps (one in exponent form),
# rows out of time order. u1: a(1.5) b(2.25) c(3.0); u2: b c d; u3: a b; u4: e (one row: dropped by --kcore 2).
INTER = """rating:float\ttimestamp:float\titem_id:token\tuser_id:token
5\t2.25\tb\tu1
4\t1.5\ta\tu1
3\t3.0e0\tc\tu1
1\t978300760.5\td\tu2
2\t978300700\tb\tu2
2\t978300730.25\tc\tu2
5\t10\ta\tu3
5\t11\tb\tu3
4\t7\te\tu4
"""
# d has no row; z is never interacted with; sales_rank (float) is not text, release_year (token) is
ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\tsales_rank:float\tprice:float
a\tToy Story\t1995\tAnimation Comedy\t3\t9.99
b\t"Weird" Al\t1989\t\t7\t
c\tHeat\t1995\tAction Crime\t1\t12.5
e\tSeven\t1995\tThriller\t2\t5
z\tNever Rated\t2001\tDrama\t9\t1
"""


def atomic(tmp_path, inter=INTER, item=ITEM, name="shop"):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    (src / f"{name}.inter").write_text(inter)
    if item is not None:
        (src / f"{name}.item").write_text(item)
    return src


def sequences(ds):
    return {u: [ds.item_ids[i - 1] for i in s] for u, s in zip(ds.user_ids, ds.seqs)}


def test_recbole_atomic_files_convert_with_text_and_counts(tmp_path):
    src = atomic(tmp_path)
    p = run_script("data/prepare.py", "recbole", "--src", src, "--name", "shop", "--out", tmp_path / "out",
                   "--kcore", "0")
    # by hand: 4 users, 5 items (a b c d e; z never interacted), 9 interactions
    assert json.loads(p.stdout) == {"users": 4, "items": 5, "interactions": 9, "items_with_image": 0}
    assert "shop.item: 1 item(s) of shop.inter have no row" in p.stderr
    ds = load_dataset(tmp_path / "out")
    assert sequences(ds) == {"u1": ["a", "b", "c"], "u2": ["b", "c", "d"], "u3": ["a", "b"], "u4": ["e"]}
    items = {it["item_id"]: {k: v for k, v in it.items() if k != "_line"} for it in ds.items}
    assert items["a"] == {"item_id": "a", "title": "Toy Story", "categories": ["Animation Comedy"], "price": "9.99",
                          "description": "release_year: 1995"}
    assert items["b"] == {"item_id": "b", "title": '"Weird" Al', "description": "release_year: 1989"}  # not quoted
    assert items["d"] == {"item_id": "d"} and "z" not in items
    # --kcore 2 (the flag of the other converters): u4 and e (one row each) go, and d (one row); u2 keeps b, c
    assert prepare.main(["recbole", "--src", str(src), "--name", "shop", "--out", str(tmp_path / "k2"),
                         "--kcore", "2"]) == {"users": 3, "items": 3, "interactions": 7, "items_with_image": 0}
    assert sequences(load_dataset(tmp_path / "k2")) == {"u1": ["a", "b", "c"], "u2": ["b", "c"], "u3": ["a", "b"]}


def test_recbole_without_an_item_file_is_an_id_only_dataset(tmp_path):
    src = atomic(tmp_path, item=None)
    p = run_script("data/prepare.py", "recbole", "--src", src, "--name", "shop", "--out", tmp_path / "out",
                   "--kcore", "0")
    assert json.loads(p.stdout) == {"users": 4, "items": 5, "interactions": 9, "items_with_image": 0}
    assert "shop.item: not found; items get no text" in p.stderr
    ds = load_dataset(tmp_path / "out")
    assert [it["item_id"] for it in ds.items] == ["b", "a", "c", "d", "e"] and ds.report["items_without_text"] == 5


def test_recbole_fields_are_chosen_by_name(tmp_path):
    inter = "uid:token\tiid:token\tts:float\nx\tp\t2\nx\tq\t1\n"
    src = atomic(tmp_path, inter=inter, item="iid:token\ttitle:token_seq\np\tPen\n")
    prepare.main(["recbole", "--src", str(src), "--name", "shop", "--out", str(tmp_path / "out"), "--kcore", "0",
                  "--user-field", "uid", "--item-field", "iid", "--time-field", "ts"])
    ds = load_dataset(tmp_path / "out")
    assert sequences(ds) == {"x": ["q", "p"]} and ds.items[ds.item_ids.index("p")]["title"] == "Pen"


@pytest.mark.parametrize("inter,item,error", [
    ("user_id:token\titem_id\ttimestamp:float\nu\ti\t1\n", None,
     "shop.inter:1: column 2 'item_id': a typed header is 'name:type' with type one of token, token_seq, float"),
    ("user_id:token\titem_id:token\ttimestamp:date\nu\ti\t1\n", None, "shop.inter:1: column 3 'timestamp:date'"),
    ("user:token\titem_id:token\nu\ti\n", None, "shop.inter:1: no field 'user_id' in the header"),
    ("user_id:token\titem_id:token\ttimestamp:token\nu\ti\t1\n", None,
     "shop.inter:1: field 'timestamp' is declared token, expected float"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\nu\tj\tsoon\n", None,
     "shop.inter:3: field 'timestamp': 'soon' is not a finite number"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\tx\n", None,
     "shop.inter:2: expected 3 tab-separated fields (user_id, item_id, timestamp), got 4"),
    ("user_id:token\titem_id:token\ttimestamp:float\nu\ti\t1\n", "item_id:token\ttitle:token_seq\ni\tA\ni\tB\n",
     "shop.item:3: field 'item_id': duplicate item id 'i' (first defined on line 2)"),
])
def test_recbole_bad_input_names_file_line_and_field(tmp_path, inter, item, error):
    src = atomic(tmp_path, inter=inter, item=item)
    with pytest.raises(prepare.PrepareError) as e:
        prepare.main(["recbole", "--src", str(src), "--name", "shop", "--out", str(tmp_path / "out"), "--kcore", "0"])
    assert error in str(e.value) and str(e.value).startswith(str(src))


def test_recbole_malformed_header_from_the_command_line(tmp_path):
    src = atomic(tmp_path, inter="user_id:token\titem_id\ttimestamp:float\nu\ti\t1\n", item=None)
    p = run_script("data/prepare.py", "recbole", "--src", src, "--name", "shop", "--out", tmp_path / "out",
                   check=False)
    assert p.returncode == 1 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {src / 'shop.inter'}:1: column 2 'item_id'")
    assert not (tmp_path / "out").exists()  # nothing is written for bad input
