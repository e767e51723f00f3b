"""common.py as a specification: bad input names file, line and field; images and text are counted, never dropped;
chronological sequences and the leave-one-out split; atomic, fingerprinted artifacts; config flags."""
import json
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, write_dataset
from common import (ArtifactError, DatasetError, FORMAT_VERSION, item_text, load_artifact, load_dataset,
                    parse_config, save_artifact, seed_everything)

ITEMS = [{"item_id": "a", "title": "Alpha"}, {"item_id": "b", "title": "Beta"}, {"item_id": "c", "title": "Gamma"}]


def make(tmp_path, items_lines, csv_lines):
    """A dataset directory from raw items.jsonl lines and raw interactions.csv lines (header included)."""
    d = tmp_path / "ds"
    d.mkdir(exist_ok=True)
    (d / "items.jsonl").write_text("".join(line + "\n" for line in items_lines))
    (d / "interactions.csv").write_text("".join(line + "\n" for line in csv_lines))
    return d


def items_lines(items=ITEMS):
    return [json.dumps(it) for it in items]


def raises(d, *fragments):
    with pytest.raises(DatasetError) as e:
        load_dataset(d)
    msg = str(e.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in error message: {msg}"
    return msg


# ---- bad input: a clear DatasetError naming the file, the line and the field ----

def test_malformed_csv_row_names_file_line_and_fields(tmp_path):
    d = make(tmp_path, items_lines(), ["user_id,item_id,timestamp", "u1,a,1", "u1,b", "u1,c,3"])
    raises(d, "interactions.csv:3:", "user_id,item_id,timestamp", "got 2")


def test_bad_header(tmp_path):
    d = make(tmp_path, items_lines(), ["user,item,time", "u1,a,1"])
    raises(d, "interactions.csv:1:", "header")


def test_unknown_item_id_names_first_line_and_counts_all(tmp_path):
    d = make(tmp_path, items_lines(), ["user_id,item_id,timestamp", "u1,a,1", "u1,zz,2", "u2,b,1", "u2,yy,5"])
    raises(d, "interactions.csv:3:", "field 'item_id'", "'zz'", "2 row(s)")


def test_duplicate_item_id_names_both_lines(tmp_path):
    lines = items_lines() + [json.dumps({"item_id": "b", "title": "again"})]
    d = make(tmp_path, lines, ["user_id,item_id,timestamp", "u1,a,1"])
    raises(d, "items.jsonl:4:", "field 'item_id'", "duplicate", "'b'", "line 2")


def test_bad_json_line(tmp_path):
    lines = items_lines()
    lines[1] = '{"item_id": "b", "title": '
    d = make(tmp_path, lines, ["user_id,item_id,timestamp", "u1,a,1"])
    raises(d, "items.jsonl:2:", "not valid JSON")


def test_item_without_id(tmp_path):
    d = make(tmp_path, items_lines() + ['{"title": "no id"}'], ["user_id,item_id,timestamp", "u1,a,1"])
    raises(d, "items.jsonl:4:", "field 'item_id'")


@pytest.mark.parametrize("bad", ["yesterday", "12:30", "nan", "inf"])
def test_bad_timestamp(tmp_path, bad):
    d = make(tmp_path, items_lines(), ["user_id,item_id,timestamp", "u1,a,1", f"u1,b,{bad}"])
    raises(d, "interactions.csv:3:", "field 'timestamp'", repr(bad))


def test_iso_dates_are_timestamps(tmp_path):
    d = make(tmp_path, items_lines(), ["user_id,item_id,timestamp", "u1,b,2024-01-02", "u1,a,2024-01-01T10:00"])
    assert [d_ for d_ in load_dataset(d).seqs[0]] == [1, 2]  # a (Jan 1) before b (Jan 2)


def test_missing_files(tmp_path):
    with pytest.raises(DatasetError, match="items.jsonl: file not found"):
        load_dataset(tmp_path)


# ---- images and text: reported and counted, the item is kept ----

def test_missing_and_corrupt_images_are_counted_and_items_kept(tmp_path):
    d = tmp_path / "ds"
    (d / "images").mkdir(parents=True)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(d / "images" / "a.png")
    (d / "images" / "b.jpg").write_bytes(b"\xff\xd8 this is not really a jpeg")
    items = [{"item_id": "a", "title": "A", "image": "images/a.png"},
             {"item_id": "b", "title": "B", "image": "images/b.jpg"},
             {"item_id": "c", "title": "C", "image": "images/gone.png"},
             {"item_id": "d", "title": "D"}]
    write_dataset(d, {"u1": ["a", "b", "c", "d"]}, items)
    ds = load_dataset(d)
    assert ds.item_ids == ["a", "b", "c", "d"]  # nobody dropped
    assert ds.images[0] == d / "images" / "a.png" and ds.images[1:] == [None, None, None]
    r = ds.report
    assert (r["items_with_image"], r["images_missing"], r["images_unreadable"]) == (1, 1, 1)
    assert ds.texts()[1] == "B"  # an item whose image is broken keeps its text


def test_items_without_text_are_counted(tmp_path):
    items = [{"item_id": "a", "title": "A"}, {"item_id": "b"}, {"item_id": "c", "title": "", "brand": None}]
    d = write_dataset(tmp_path / "ds", {"u1": ["a", "b", "c"]}, items)
    ds = load_dataset(d)
    assert ds.report["items_without_text"] == 2
    assert ds.texts() == ["A", "", ""]


def test_item_text_order():
    meta = {"title": "Mug.", "brand": "Acme", "categories": ["Kitchen", "Cups"], "price": 9.5, "description": "Blue."}
    assert item_text(meta) == "Mug. Brand: Acme. Categories: Kitchen, Cups. Price: 9.5. Blue"


# ---- sequences and the leave-one-out split ----

def test_chronological_order_ties_keep_file_order(tmp_path):
    items = [{"item_id": k, "title": k} for k in "abcdef"]
    lines = ["user_id,item_id,timestamp",
             "u2,f,50", "u1,c,20", "u1,a,30", "u2,e,10", "u1,b,20", "u1,d,5", "u2,a,10"]
    ds = load_dataset(make(tmp_path, items_lines(items), lines))
    name = {k + 1: v for k, v in enumerate(ds.item_ids)}
    seqs = {u: [name[i] for i in s] for u, s in zip(ds.user_ids, ds.seqs)}
    # u1: d(5) c(20) b(20, later in the file) a(30); u2: e(10) a(10, later in the file) f(50)
    assert seqs == {"u1": ["d", "c", "b", "a"], "u2": ["e", "a", "f"]}
    assert ds.user_ids == ["u2", "u1"]  # users in order of first appearance
    assert all(s.dtype == np.int64 for s in ds.seqs)


def test_leave_one_out_split(tmp_path):
    items = [{"item_id": f"i{k}", "title": f"t{k}"} for k in range(1, 7)]
    seqs = {"long": ["i1", "i2", "i3", "i4", "i5"], "three": ["i6", "i5", "i4"], "short": ["i1", "i2"]}
    ds = load_dataset(write_dataset(tmp_path / "ds", seqs, items))
    train, eval_users = ds.split()
    u = {name: k for k, name in enumerate(ds.user_ids)}
    assert train[u["long"]].tolist() == [1, 2, 3]           # validation target 4, test target 5
    assert ds.seqs[u["long"]][-2:].tolist() == [4, 5]
    assert train[u["three"]].tolist() == [6]
    assert train[u["short"]].tolist() == [1, 2]              # too short to evaluate: all of it trains
    assert sorted(eval_users.tolist()) == sorted([u["long"], u["three"]])


def test_fingerprint_tracks_content(tmp_path, tiny_dataset):
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    assert load_dataset(copy).fingerprint == load_dataset(tiny_dataset).fingerprint
    with open(copy / "interactions.csv", "a") as f:
        f.write("u0,i3,99999\n")
    assert load_dataset(copy).fingerprint != load_dataset(tiny_dataset).fingerprint


# ---- artifacts: atomic save, version/kind/fingerprint refusal ----

@dataclass
class _Cfg:
    data: str = "x"
    """dataset directory"""
    dim: int = 4
    """width"""


def test_artifact_roundtrip_keeps_config_and_refuses_other_dataset(tmp_path):
    p = save_artifact(tmp_path / "a.pt", "semantics", {"emb": torch.arange(6.0).view(2, 3)}, _Cfg(dim=7), "fp-A")
    obj = load_artifact(p, "semantics", fingerprint="fp-A")
    assert torch.equal(obj["emb"], torch.arange(6.0).view(2, 3))
    assert obj["config"] == {"data": "x", "dim": 7} and obj["format_version"] == FORMAT_VERSION
    with pytest.raises(ArtifactError, match=r"made from another dataset.*fp-A.*fp-B.*rerun"):
        load_artifact(p, "semantics", fingerprint="fp-B")
    with pytest.raises(ArtifactError, match="expected a 'aligned' artifact, found semantics"):
        load_artifact(p, "aligned")
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "nope.pt", "semantics")


def test_artifact_from_another_format_version_is_refused(tmp_path):
    p = tmp_path / "old.pt"
    torch.save({"format_version": FORMAT_VERSION + 1, "kind": "fused", "fingerprint": "f"}, p)
    with pytest.raises(ArtifactError, match="format version"):
        load_artifact(p, "fused", fingerprint="f")


def test_artifact_from_other_real_dataset_is_refused(tmp_path, tiny_dataset):
    other = write_dataset(tmp_path / "other", {"u": ["x", "y", "x"]}, [{"item_id": "x"}, {"item_id": "y"}])
    a, b = load_dataset(tiny_dataset), load_dataset(other)
    p = save_artifact(tmp_path / "s.pt", "semantics", {}, _Cfg(), a.fingerprint)
    assert load_artifact(p, "semantics", fingerprint=a.fingerprint)["kind"] == "semantics"
    with pytest.raises(ArtifactError, match="another dataset"):
        load_artifact(p, "semantics", fingerprint=b.fingerprint)


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {root!r})
    sys.path.insert(0, {root!r} + "/tests")
    import common
    from stalling import StallingFile

    _open = open
    common.open = lambda p, mode="r", *a, **k: (StallingFile(_open(p, mode, *a, **k), 1 << 20, 60) if "w" in mode
                                                else _open(p, mode))
    common.save_artifact(sys.argv[1], "semantics", {{"emb": torch.ones(2_000_000)}}, {{"run": "new"}}, "fp")
""")


def test_writer_killed_mid_write_leaves_previous_artifact_intact(tmp_path):
    path = tmp_path / "semantics.pt"
    save_artifact(path, "semantics", {"emb": torch.zeros(3)}, {"run": "old"}, "fp")
    before = path.read_bytes()
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "PARTIAL", "writer never reached the middle of its write"
        partial = list(tmp_path.glob(".semantics.pt.tmp*"))
        assert len(partial) == 1 and partial[0].stat().st_size > 1 << 20  # a real half-written file exists...
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert path.read_bytes() == before  # ...and the artifact itself is untouched and loadable
    obj = load_artifact(path, "semantics", fingerprint="fp")
    assert obj["config"] == {"run": "old"} and torch.equal(obj["emb"], torch.zeros(3))


# ---- config flags ----

@dataclass
class _StageCfg:
    data: str
    """dataset directory"""
    lr: float = 1e-3
    """learning rate"""
    batch_size: int = 32
    """sequences per batch"""
    name: str = "run"
    """run name"""
    use_fusion: bool = True
    """plug in the fused dual view"""


def test_parse_config_flags_defaults_and_bools():
    cfg = parse_config(_StageCfg, ["data/toy", "--lr", "0.5", "--batch-size", "8", "--no-use-fusion"])
    assert cfg == _StageCfg(data="data/toy", lr=0.5, batch_size=8, name="run", use_fusion=False)
    assert parse_config(_StageCfg, ["d"]) == _StageCfg(data="d")
    assert isinstance(parse_config(_StageCfg, ["d", "--batch-size", "3"]).batch_size, int)


def test_parse_config_help_shows_field_docstrings(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(_StageCfg, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag, doc in [("--batch-size", "sequences per batch"), ("--lr", "learning rate"),
                      ("--use-fusion", "plug in the fused dual view")]:
        assert flag in out and doc in out


def test_parse_config_unknown_flag_and_bad_type_are_errors(capsys):
    with pytest.raises(SystemExit) as e:
        parse_config(_StageCfg, ["d", "--learning-rate", "3"])
    assert e.value.code == 2 and "unrecognized arguments: --learning-rate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(_StageCfg, ["d", "--batch-size", "many"])
    assert "invalid int value" in capsys.readouterr().err


def test_seed_everything_repeats_draws():
    seed_everything(3)
    a = (np.random.rand(3), torch.rand(3))
    seed_everything(3)
    b = (np.random.rand(3), torch.rand(3))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_seed_everything_makes_cpu_training_repeat_at_any_thread_count():
    """The backward of table[ids] with repeated ids (every stage's lookups) sums rows with atomics across threads unless
    torch's deterministic kernels are on: the float sums' order, and so the trained model, then varies run to run.
    seed_everything turns them on for CPU runs."""
    threads, was = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        torch.set_num_threads(2)
        seed_everything(0, "cpu")
        assert torch.are_deterministic_algorithms_enabled()
        x = torch.randn(200, 64, requires_grad=True)
        ids, g = torch.randint(0, 200, (20000,)), torch.randn(20000, 64)
        grads = []
        for _ in range(5):
            x.grad = None
            (x[ids] * g).sum().backward()
            grads.append(x.grad.clone())
        assert all(torch.equal(grads[0], gr) for gr in grads[1:])
        exact = torch.zeros(200, 64, dtype=torch.float64).index_add_(0, ids, g.double())
        assert torch.allclose(grads[0].double(), exact, atol=1e-3)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was)
