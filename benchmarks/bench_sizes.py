"""Every GPT-2 size against Hugging Face transformers: load, forward, cache, gradients, EAP, generation.

For each size, random weights of its shape are written once in the hub's layout
(``common.random_checkpoint_folder``: ``$TMPDIR/npgpt2-bench-{size}``, deleted afterwards unless
``--keep``; gpt2-xl is 6.2 GB on disk), then each side runs in its own child process, one after
the other (never two models of that size in one process), batch 1, float32:

  load            ``npgpt2.from_pretrained(folder)`` / ``GPT2LMHeadModel.from_pretrained(folder)``,
                  median of warm loads (the file was just written or read: the OS has it cached);
                  the floor is reading model.safetensors once into memory (``np.fromfile``);
  forward         logits at 128 and 1024 tokens (transformers: eval(), no_grad, sdpa attention);
  cache           ``run_with_cache`` keeping every ``hook_resid_post`` at 1024 tokens /
                  transformers' ``output_hidden_states=True``;
  gradients       ``value_and_grad`` (mean next-token loss, every parameter's gradient) at 256
                  tokens / torch's forward + ``loss.backward()``;
  EAP             ``edge_attribution(method="eap")`` on a clean/corrupted pair of 15 tokens, every
                  edge / what any EAP on torch must run at least: a clean forward and a corrupted
                  forward + backward (no scores); also in npgpt2 forward passes of the same length;
  generation      greedy, 32 new tokens after a 16-token prompt: npgpt2's ``generate`` /
                  transformers' ``generate(do_sample=False)`` with its key/value cache.

Each time is a median over ``--repeats`` runs after a warm-up, torch with its default threads; each
peak is the child's resident memory high-water mark during that measurement (weights included).
``--rounds N`` runs the two sides' children N times, taking turns, and reports each measurement's
median time over the rounds and, as its ratio, the median of the rounds' ratios (each side's time
beside the other's in the same round): on a machine whose speed drifts, both sides then see the
same spread of it.
``--only`` picks measurements (forward, cache, gradients, eap, generate; the load always runs).
Each side's GFLOP/s in the forward passes is printed to explain a missed target, and with
``--floor`` the matrix-multiply floor of npgpt2's forward (``common.matmul_products``, the same BLAS)
and generation's (``weight_reads``: every weight read once per new token). Targets: forward <= 0.9x and generation
<= 0.6x transformers' time, gradients <= 0.8x torch's, load no slower than reading the file once.

    python benchmarks/bench_sizes.py [--sizes gpt2-medium,gpt2-large,gpt2-xl] [--repeats 3] [--rounds 1]
        [--only forward,cache,gradients,eap,generate] [--keep] [--floor] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import (current_rss, describe_machine, matmul_products, median_time, peak_rss,  # noqa: E402
                    random_checkpoint_folder, reset_peak_rss)

PROMPT, NEW = 16, 32  # generation: prompt length, new tokens
QUICK = os.environ.get("NPGPT2_BENCH_QUICK") == "1"  # --quick: no warm-up after the first measurement
THREADS = int(os.environ.get("NPGPT2_BENCH_THREADS", "0"))  # 0: each library's default (--threads)
TARGETS = {"forward 128": 0.9, "forward 1024": 0.9, "gradients 256": 0.8, "generate 16+32": 0.6}
KINDS = ("forward", "cache", "gradients", "eap", "generate")  # what --only chooses from
ONLY = set(os.environ.get("NPGPT2_BENCH_ONLY", ",".join(KINDS)).split(","))  # --only, for the children


def tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50257, (1, n))


def eap_pair():
    """A clean/corrupted pair of 15 tokens (two positions changed) and the tokens the metric compares."""
    clean = tokens(15, 15)
    corrupted = clean.copy()
    corrupted[:, [2, 9]] = np.random.default_rng(16).integers(0, 50257, (1, 2))
    return clean, corrupted, (11, 12)


def measure(results: dict, name: str, fn, repeats: int) -> None:
    """Median time of ``fn`` and the process's peak memory while it ran, into ``results[name]``.
    A warm-up run first, unless ``--quick`` (then only the first measurement has one)."""
    reset_peak_rss()
    warmup = not QUICK or name == "forward 128"  # each side's first measurement
    results[name] = {"s": median_time(fn, repeats, warmup=warmup), "peak": peak_rss()}
    print(f"  {name}: {results[name]['s']:.3f} s", file=sys.stderr, flush=True)


def load_times(load, repeats: int):
    """(the first load in this process, the median of ``repeats`` later ones, the model)."""
    t = time.perf_counter()
    model = load()
    first = time.perf_counter() - t
    later = []
    for _ in range(repeats):
        del model
        t = time.perf_counter()
        model = load()
        later.append(time.perf_counter() - t)
    return first, float(np.median(later)), model


def child_npgpt2(folder: str, repeats: int, floor: bool = False) -> dict:
    import npgpt2
    from npgpt2.analysis.edges import edge_attribution
    from npgpt2.analysis.patching import logit_diff_metric

    if THREADS:
        npgpt2.set_num_threads(THREADS)
    first, warm, model = load_times(lambda: npgpt2.from_pretrained(folder), repeats)
    r = {"load": {"s": warm, "first": first, "peak": peak_rss()}, "threads": npgpt2.get_num_threads()}
    for n in (128, 1024) if "forward" in ONLY else ():
        t = tokens(n, n)
        measure(r, f"forward {n}", lambda: model(t), repeats)
        if floor:
            measure(r, f"floor {n}", matmul_products(model.cfg, n), repeats)
    if "cache" in ONLY:
        t = tokens(1024, 1024)
        measure(r, "cache 1024", lambda: model.run_with_cache(
            t, names_filter=lambda name: name.endswith("hook_resid_post")), repeats)
    if "gradients" in ONLY:
        t = tokens(256, 256)
        measure(r, "gradients 256", lambda: model.value_and_grad(t), repeats)
    if "eap" in ONLY:
        clean, corrupted, (right, wrong) = eap_pair()
        metric = logit_diff_metric(right, wrong)
        measure(r, "EAP 15", lambda: edge_attribution(model, clean, corrupted, metric, method="eap"), repeats)
        measure(r, "forward 15", lambda: model(corrupted), repeats)
    if "generate" in ONLY:
        prompt = tokens(PROMPT, 7)
        gen = lambda: model.generate(prompt, max_new_tokens=NEW, stop_at_eos=False, return_type="tokens")  # noqa: E731
        measure(r, f"generate {PROMPT}+{NEW}", gen, repeats)
        r["generated"] = np.asarray(gen()).ravel()[-NEW:].tolist()
        if floor:
            measure(r, "floor generate", weight_reads(model, NEW), repeats)
    return r


def weight_reads(model, passes: int):
    """A function that reads every weight as one greedy step must, ``passes`` times: one row times
    each block's W_qkv, W_O, W_in and W_out and times W_U (the model's own arrays), with numpy's
    BLAS. A token of generation cannot cost less: the floor generation is judged by (at these
    sizes, the speed at which this machine reads memory)."""
    w = model.weights
    mats = [W for b in w.blocks for W in (b.W_qkv, b.W_O, b.W_in, b.W_out)] + [w.W_U]
    rows = [np.ones((1, W.shape[0]), W.dtype) for W in mats]
    outs = [np.empty((1, W.shape[1]), W.dtype) for W in mats]

    def reads():
        for _ in range(passes):
            for x, W, out in zip(rows, mats, outs):
                np.matmul(x, W, out=out)

    return reads


def child_transformers(folder: str, repeats: int) -> dict:
    import torch
    from transformers import GPT2LMHeadModel

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no 'Loading weights' bars in the table
    if THREADS:
        torch.set_num_threads(THREADS)
    load = lambda: GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32).eval()  # noqa: E731
    first, warm, hf = load_times(load, repeats)
    r = {"load": {"s": warm, "first": first, "peak": peak_rss()}, "threads": torch.get_num_threads()}
    t_ = lambda n, seed: torch.from_numpy(tokens(n, seed))  # noqa: E731
    with torch.no_grad():
        for n in (128, 1024) if "forward" in ONLY else ():
            t = t_(n, n)
            measure(r, f"forward {n}", lambda: hf(t).logits, repeats)
        if "cache" in ONLY:
            t = t_(1024, 1024)
            measure(r, "cache 1024", lambda: hf(t, output_hidden_states=True).hidden_states, repeats)
    t = t_(256, 256)

    def forward_backward():
        hf.zero_grad(set_to_none=True)
        hf(t, labels=t).loss.backward()

    if "gradients" in ONLY:
        measure(r, "gradients 256", forward_backward, repeats)
    clean, corrupted, (right, wrong) = (torch.from_numpy(a) if isinstance(a, np.ndarray) else a for a in eap_pair())

    def eap_floor():  # a clean forward, a corrupted forward + backward of the logit difference
        with torch.no_grad():
            hf(clean)
        hf.zero_grad(set_to_none=True)
        logits = hf(corrupted).logits
        (logits[0, -1, right] - logits[0, -1, wrong]).backward()

    if "eap" in ONLY:
        measure(r, "EAP 15", eap_floor, repeats)
    hf.zero_grad(set_to_none=True)
    with torch.no_grad():
        if "eap" in ONLY:
            measure(r, "forward 15", lambda: hf(corrupted).logits, repeats)
        if "generate" not in ONLY:
            return r
        prompt = t_(PROMPT, 7)

        def gen():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, use_cache=True, pad_token_id=50256)

        measure(r, f"generate {PROMPT}+{NEW}", gen, repeats)
        r["generated"] = gen()[0, -NEW:].tolist()
    return r


def child_read(folder: str, repeats: int) -> dict:
    """Reading model.safetensors once into memory: the floor a load is judged by."""
    path = os.path.join(folder, "model.safetensors")
    return {"read": median_time(lambda: np.fromfile(path, dtype=np.uint8), repeats),
            "bytes": os.path.getsize(path)}


def child_write(folder: str, size: str) -> dict:
    t = time.perf_counter()
    random_checkpoint_folder(size, folder)
    return {"write": time.perf_counter() - t}


def run_child(*args, floor: bool = False) -> dict:
    """Run this script as a child (``--child ...``); its result is the last line it prints (JSON)."""
    cmd = [sys.executable, __file__, "--child", *map(str, args)] + (["--floor"] if floor else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def forward_flops(cfg, n: int) -> float:
    """Multiply-adds x 2 of a forward pass at ``n`` tokens: the linear layers, the causal half of
    q k^T and pattern v, the unembedding."""
    d = cfg.d_model
    return cfg.n_layer * (2 * n * d * (3 * d + d + 2 * cfg.d_mlp) + 2 * n * n * d) + 2 * n * d * cfg.d_vocab


def report(size: str, cfg, ours: dict, theirs: dict, read: dict) -> list[str]:
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    lines = [f"\n{size}: {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}; "
             f"model.safetensors {read['bytes'] / 1e9:.2f} GB; npgpt2 threads {ours['threads']}, "
             f"torch threads {theirs['threads']}; load average {os.getloadavg()[0]:.1f}",
             f"{'what':<26}{'npgpt2 s':>10}{'transf. s':>11}{'ratio':>7}{'target':>8}"
             f"{'npgpt2 GB':>11}{'transf. GB':>12}"]
    for name in ("load", "forward 128", "forward 1024", "cache 1024", "gradients 256", "EAP 15",
                 f"generate {PROMPT}+{NEW}"):
        if name not in ours:  # (not chosen with --only)
            continue
        a, b = ours[name], theirs[name]
        target = TARGETS.get(name)
        # with --rounds: the median of each round's ratio (a side's time beside the other's, run
        # right after it), which the machine's drift moves less than the ratio of the medians
        ratio = float(np.median(np.divide(a["each"], b["each"]))) if "each" in a else a["s"] / b["s"]
        mark = "" if target is None else ("  ok" if ratio <= target else "  MISSED")
        lines.append(f"{name:<26}{a['s']:>10.3f}{b['s']:>11.3f}{ratio:>7.2f}"
                     f"{'<= ' + str(target) if target else '':>8}{gb(a['peak']):>11}{gb(b['peak']):>12}{mark}")
        if "each" in a:  # --rounds: every round's ratio, in the order they ran
            lines.append(f"{'':<4}rounds: " + ", ".join(f"{x:.3f}/{y:.3f} = {x / y:.2f}" for x, y in zip(a["each"], b["each"])))
    load = ours["load"]["s"]
    lines.append(f"load: npgpt2 {load:.3f} s (first in its process {ours['load']['first']:.3f} s; the weights are "
                 f"memory-mapped, paged in by the first forward), transformers {theirs['load']['s']:.3f} s "
                 f"(first {theirs['load']['first']:.3f} s); reading the file once {read['read']:.3f} s: npgpt2 / "
                 f"that = {load / read['read']:.2f} (target <= 1){'' if load <= read['read'] else '  MISSED'}")
    for n in (128, 1024) if "forward 128" in ours else ():
        flops = forward_flops(cfg, n)
        f, tr = ours[f"forward {n}"]["s"], theirs[f"forward {n}"]["s"]
        line = f"forward {n:>4}: GFLOP/s npgpt2 {flops / f / 1e9:.0f}, transformers {flops / tr / 1e9:.0f}"
        if f"floor {n}" in ours:
            fl = ours[f"floor {n}"]["s"]
            line += f"; npgpt2's matrix-multiply floor (numpy's BLAS) {flops / fl / 1e9:.0f}, npgpt2 / floor = {f / fl:.2f}"
        lines.append(line)
    if "EAP 15" in ours:
        eap = ours["EAP 15"]["s"]
        lines.append(f"EAP at 15 tokens = {eap / ours['forward 15']['s']:.1f} npgpt2 forward passes; the torch floor "
                     f"(clean forward + corrupted forward and backward) = "
                     f"{theirs['EAP 15']['s'] / theirs['forward 15']['s']:.1f} transformers forward passes")
    if "generated" in ours:
        lines.append(f"greedy generation: same tokens on both sides: {ours['generated'] == theirs['generated']}")
    if "floor generate" in ours:
        fl, name = ours["floor generate"]["s"], f"generate {PROMPT}+{NEW}"
        weights = 4 * (cfg.n_layer * (4 * cfg.d_model ** 2 + 2 * cfg.d_model * cfg.d_mlp) + cfg.d_model * cfg.d_vocab)
        lines.append(f"generation's floor (every weight read once per new token, {NEW} times, numpy's BLAS): {fl:.3f} s, "
                     f"{NEW * weights / fl / 1e9:.1f} GB/s; npgpt2 / floor = {ours[name]['s'] / fl:.2f}, transformers / "
                     f"floor = {theirs[name]['s'] / fl:.2f}: npgpt2 at its floor would be {fl / theirs[name]['s']:.2f}x transformers")
    return lines


def combine(rounds: list[dict]) -> dict:
    """One child's results over several rounds: each time the median, each peak the largest."""
    out = dict(rounds[0])
    for name, first in rounds[0].items():
        if isinstance(first, dict) and "s" in first:
            out[name] = dict(first, s=float(np.median([r[name]["s"] for r in rounds])),
                             peak=max(r[name]["peak"] for r in rounds))
            if len(rounds) > 1:
                out[name]["each"] = [r[name]["s"] for r in rounds]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="gpt2-medium,gpt2-large,gpt2-xl")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each side's child this many times, taking turns; report the medians")
    ap.add_argument("--only", default=",".join(KINDS),
                    help=f"the measurements to make, from {','.join(KINDS)} (default: all; the load always)")
    ap.add_argument("--root", default=tempfile.gettempdir(), help="where the checkpoint folders go")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint folders afterwards")
    ap.add_argument("--floor", action="store_true",
                    help="also time npgpt2's matrix-multiply floor at 128 and 1024 tokens (common.matmul_products) "
                         "and generation's (every weight read once per new token)")
    ap.add_argument("--threads", type=int, default=0,
                    help="threads of both sides (npgpt2.set_num_threads, torch.set_num_threads); "
                    "default: each library's own (one per core)")
    ap.add_argument("--quick", action="store_true",
                    help="one warm-up run per side (before its first forward) instead of one per measurement")
    ap.add_argument("--child", nargs=3, metavar=("WHAT", "FOLDER", "ARG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        what, folder, arg = args.child
        if what == "write":
            result = child_write(folder, arg)
        elif what == "npgpt2":
            result = child_npgpt2(folder, int(arg), args.floor)
        else:
            result = {"transformers": child_transformers, "read": child_read}[what](folder, int(arg))
        result["rss_end"] = current_rss()
        print(json.dumps(result))
        return

    import npgpt2
    from npgpt2.config import KNOWN_SIZES

    print(describe_machine())
    unknown = set(args.only.split(",")) - set(KINDS)
    if unknown or args.rounds < 1:
        ap.error(f"--only {args.only!r}: expected some of {','.join(KINDS)}" if unknown else
                 f"--rounds {args.rounds}: expected at least 1")
    os.environ["NPGPT2_BENCH_ONLY"] = args.only  # for the children
    if args.threads:
        os.environ["NPGPT2_BENCH_THREADS"] = str(args.threads)  # for the children
        print(f"both sides on {args.threads} thread(s)")
    if args.quick:
        os.environ["NPGPT2_BENCH_QUICK"] = "1"
        print("quick: a warm-up run only before each side's first forward pass")
    lines = []
    for size in args.sizes.split(","):
        n_layer, n_head, n_embd = KNOWN_SIZES[size]
        cfg = npgpt2.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        folder = os.path.join(args.root, f"npgpt2-bench-{'gpt2-small' if size == 'gpt2' else size}")
        existed = os.path.exists(os.path.join(folder, "model.safetensors"))
        print(f"\n{size}: weights in {folder}" + (" (reused)" if existed else ""), flush=True)
        try:
            if not existed:
                print(f"  written in {run_child('write', folder, size)['write']:.1f} s", flush=True)
            read = run_child("read", folder, args.repeats)
            rounds = [(run_child("npgpt2", folder, args.repeats, floor=args.floor),
                       run_child("transformers", folder, args.repeats)) for _ in range(args.rounds)]
            ours, theirs = combine([o for o, _ in rounds]), combine([t for _, t in rounds])
        finally:
            if not args.keep and not existed:
                shutil.rmtree(folder, ignore_errors=True)
        size_lines = report(size, cfg, ours, theirs, read)
        print("\n".join(size_lines), flush=True)
        lines += size_lines
    print("\n" + describe_machine())
    print("\n".join(lines))


if __name__ == "__main__":
    main()
