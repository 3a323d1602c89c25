"""Exact activation patching against TransformerLens 4.3's same sweeps, in one run.

On randomly initialised gpt2-small-shaped weights, a batch of prompt pairs of 15 tokens (clean,
and corrupted at one position, as IOI-style pairs differ), each exact sweep in npgpt2
(``npgpt2.analysis.patching``) and in TransformerLens (``transformer_lens.patching`` on a
``TransformerBridge`` built from the same weights): resid_pre, attn_out and mlp_out by position,
every head by position (the five sweeps of ``get_act_patch_attn_head_by_pos_every``) and the
head output, q, k, v and pattern over all positions. Each pair of results must agree within
float32's tolerance; the script prints the time of each, the ratio (target >= 20x) and, for
npgpt2, the arithmetic its products did and at what rate, beside the rate of a plain product
with as many rows. One TransformerLens run of a sweep is one full forward pass per index: the
every-head sweep is 10,800 of them (minutes).

    python benchmarks/bench_patching.py [--batch 1] [--tokens 15] [--corrupt-at 5]
                                        [--sweeps resid_pre,attn_head_out_all_pos,...] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import time

import numpy as np

import npgpt2
from common import describe_machine, gpt2_small_folder, median_time
from npgpt2.analysis import patching

SWEEPS = ["resid_pre", "attn_out", "mlp_out", "attn_head_by_pos_every", "attn_head_out_all_pos",
          "attn_head_q_all_pos", "attn_head_k_all_pos", "attn_head_v_all_pos", "attn_head_pattern_all_pos"]
# the single sweeps an every-sweep is made of (to count its runs)
PARTS = {"attn_head_by_pos_every": ["attn_head_out_by_pos", "attn_head_q_by_pos", "attn_head_k_by_pos",
                                    "attn_head_v_by_pos", "attn_head_pattern_by_pos"]}


def transformer_lens_bridge(folder: str):
    """TransformerLens 4's model (a TransformerBridge over transformers' GPT2LMHeadModel) on the
    checkpoint in ``folder``, without weight processing (as npgpt2 loads it)."""
    import torch
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    tok = transformers.GPT2TokenizerFast.from_pretrained(folder)
    return TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok, dtype=torch.float32)


def products_done(model, tokens, clean_cache, metric, sweep: str) -> tuple[float, int]:
    """(GFLOP of the linear layers' products npgpt2's sweep ran, counted as they ran: every
    ``ops.linear`` call in one more run of the sweep, the corrupted run's included; the attention's
    q k^T and pattern v, a few percent more, are not counted. The rows of its median product,
    weighted by arithmetic: half the GFLOP were done in products of fewer rows. A product counts
    whole, as ``fast.linear`` and each block of ``fast.blocks`` take it, not by the tiles they cut
    it into.)"""
    from npgpt2 import fast, ops

    done, products = [], []  # (rows, n_in, n_out) of each ops.linear call; (rows, GFLOP) of each product
    real_ops, real_fast, real_blocks = ops.linear, fast.linear, fast.blocks

    def counted_ops(x, W, *args, **kwargs):
        done.append((x.size // x.shape[-1], W.shape[0], W.shape[1]))
        return real_ops(x, W, *args, **kwargs)

    def counted_fast(x, W, *args, **kwargs):
        rows = x.size // x.shape[-1]
        products.append((rows, 2 * rows * W.shape[0] * W.shape[1] / 1e9))
        return real_fast(x, W, *args, **kwargs)

    def counted_blocks(model, resid, start, stop, *args):  # each block's products, whole (fast.py cuts them into tiles)
        rows, (d, m) = resid.shape[0] * resid.shape[1], (model.cfg.d_model, model.cfg.d_mlp)
        products.extend([(rows, 2 * rows * (4 * d * d + 2 * d * m) / 1e9)] * (stop - start))
        return real_blocks(model, resid, start, stop, *args)

    ops.linear, fast.linear, fast.blocks = counted_ops, counted_fast, counted_blocks
    try:
        getattr(patching, f"get_act_patch_{sweep}")(model, tokens, clean_cache, metric, progress=False)
    finally:
        ops.linear, fast.linear, fast.blocks = real_ops, real_fast, real_blocks
    gflop = sum(2 * rows * n_in * n_out for rows, n_in, n_out in done) / 1e9
    products.sort()
    weight = np.cumsum([g for _, g in products])
    median_rows = products[int(np.searchsorted(weight, weight[-1] / 2))][0] if products else 0
    return gflop, median_rows


def full_forward_gflop(cfg, batch: int, n_pos: int) -> float:
    """GFLOP of the products of one full forward pass (what TransformerLens runs per patch)."""
    d, m = cfg.d_model, cfg.d_mlp
    per_row = cfg.n_layer * (2 * (d * 3 * d + d * d + 2 * d * m) + 4 * (n_pos + 1) / 2 * d) + 2 * d * cfg.d_vocab
    return batch * n_pos * per_row / 1e9


def product_rate(rows: int, d_model: int, d_mlp: int, repeats: int = 5) -> float:
    """GFLOP/s of [rows, d_model] @ [d_model, d_mlp] on this machine (float32)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, d_model), dtype=np.float32)
    w = rng.standard_normal((d_model, d_mlp), dtype=np.float32)
    out = np.empty((rows, d_mlp), np.float32)
    reps = max(1, 2000 // rows)
    t = median_time(lambda: [np.matmul(a, w, out=out) for _ in range(reps)], repeats)
    return 2 * rows * d_model * d_mlp * reps / t / 1e9


def theirs_parts(sweep: str):
    """[(TransformerLens's single sweep, its axes, where its values sit in npgpt2's result)]."""
    import transformer_lens.patching as tl_patching

    if sweep not in PARTS:
        return [(getattr(tl_patching, f"get_act_patch_{sweep}"), patching.SWEEPS[sweep][1], lambda r, idx: r[idx])]
    parts = []
    for k, name in enumerate(PARTS[sweep]):
        axes = patching.SWEEPS[name][1]
        # the every-head result is [5, layer, pos, head]; the pattern's sweep is [layer, head, dest_pos]
        at = (lambda r, idx, k=k: r[k][idx]) if k < 4 else (lambda r, idx: r[4][idx[0], idx[2], idx[1]])
        parts.append((getattr(tl_patching, f"get_act_patch_{name}"), axes, at))
    return parts


def tl_sampled(parts, result, n, rng, bridge, tokens, cache, metric, model):
    """TransformerLens on ``n`` random runs of each part of a sweep (index_df): (its time scaled to
    every run, npgpt2's values at those runs, TransformerLens's)."""
    import pandas as pd
    import torch

    sizes = patching.axis_sizes(model, tokens.shape[1])
    total_time, ours, theirs = 0.0, [], []
    for fn, axes, at in parts:
        grid = np.stack(np.meshgrid(*[np.arange(sizes[a]) for a in axes], indexing="ij"), -1).reshape(-1, len(axes))
        rows = grid[rng.choice(len(grid), min(n, len(grid)), replace=False)]
        # TransformerLens's sweeps are partials of generic_activation_patch with index_axis_names set:
        # the same call with index_df instead
        keywords = {k: v for k, v in fn.keywords.items() if k != "index_axis_names"}
        t = time.perf_counter()
        with torch.no_grad():
            values = fn.func(bridge, tokens, cache, metric, index_df=pd.DataFrame(rows, columns=list(axes)),
                             **keywords).numpy()
        total_time += (time.perf_counter() - t) * len(grid) / len(rows)
        ours += [at(result, tuple(r)) for r in rows]
        theirs += list(values)
    return total_time, np.array(ours), np.array(theirs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1, help="prompt pairs (default 1)")
    ap.add_argument("--tokens", type=int, default=15)
    ap.add_argument("--corrupt-at", type=int, default=5, help="the position where corrupted prompts differ")
    ap.add_argument("--sweeps", default=",".join(SWEEPS), help=f"comma-separated, from {', '.join(SWEEPS)}")
    ap.add_argument("--repeats", type=int, default=3, help="npgpt2 runs per sweep (median); TransformerLens runs once")
    ap.add_argument("--tl-sample", type=int, default=0,
                    help="time TransformerLens on this many randomly chosen runs of each sweep (its index_df) and "
                         "scale to the whole sweep, said so in the output (default 0: every run)")
    ap.add_argument("--folder", help="reuse a checkpoint folder (written if missing)")
    args = ap.parse_args(argv)
    import torch

    import transformer_lens.patching as tl_patching

    print(describe_machine())
    print(f"load average {os.getloadavg()[0]:.2f} at the start; transformer_lens {importlib.metadata.version('transformer_lens')}")
    folder = gpt2_small_folder(args.folder)
    model = npgpt2.from_pretrained(folder)
    bridge = transformer_lens_bridge(folder)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    clean = rng.integers(0, cfg.d_vocab, (args.batch, args.tokens))
    corrupted = clean.copy()
    corrupted[:, args.corrupt_at] = (clean[:, args.corrupt_at] + 1 + rng.integers(0, 1000, args.batch)) % cfg.d_vocab
    answers, wrong = rng.integers(0, cfg.d_vocab, args.batch), rng.integers(0, cfg.d_vocab, args.batch)
    _, clean_cache = model.run_with_cache(clean)
    metric = patching.logit_diff_metric(answers, wrong)
    with torch.no_grad():
        _, tl_clean_cache = bridge.run_with_cache(torch.from_numpy(clean))
    tl_answers, tl_wrong = torch.from_numpy(answers), torch.from_numpy(wrong)
    rows = torch.arange(args.batch)

    def tl_metric(logits):
        return (logits[rows, -1, tl_answers] - logits[rows, -1, tl_wrong]).mean()

    tl_corrupted = torch.from_numpy(corrupted)
    print(f"{args.batch} prompt pair(s) of {args.tokens} tokens, corrupted at position {args.corrupt_at}; "
          f"gpt2-small shape; metric: logit difference at the last position\n")
    print("columns: runs in the sweep; time of each; ratio; largest difference of the results; npgpt2's products:"
          "\nGFLOP its linear layers did (the corrupted run's included), GFLOP/s, rows of its median product by arithmetic, a plain [rows, d_model] @ [d_model, d_mlp]'s GFLOP/s;"
          " TransformerLens's GFLOP (a full forward pass per run) and GFLOP/s")
    print(f"{'sweep':<28} {'runs':>6} {'npgpt2':>8} {'TL 4.3':>8} {'ratio':>6} {'max|diff|':>9}"
          f" {'GFLOP':>6} {'GFLOP/s':>7} {'rows':>5} {'plain':>6} {'TL GFLOP':>8} {'GFLOP/s':>7}")
    worst = []
    for sweep in args.sweeps.split(","):
        ours = getattr(patching, f"get_act_patch_{sweep}")
        theirs = getattr(tl_patching, f"get_act_patch_{sweep}")
        result = ours(model, corrupted, clean_cache, metric, progress=False)
        t_ours = median_time(lambda: ours(model, corrupted, clean_cache, metric, progress=False), args.repeats,
                             warmup=False)
        if args.tl_sample:
            t_theirs, ours_at, expected = tl_sampled(theirs_parts(sweep), result, args.tl_sample, rng,
                                                     bridge, tl_corrupted, tl_clean_cache, tl_metric, model)
        else:
            t = time.perf_counter()
            with torch.no_grad():
                expected = theirs(bridge, tl_corrupted, tl_clean_cache, tl_metric).numpy()
            t_theirs, ours_at = time.perf_counter() - t, result
        diff = float(np.abs(ours_at - expected).max())
        scale = float(np.abs(expected).max())
        if not diff <= 1e-3 * max(1.0, scale):
            raise AssertionError(f"{sweep}: npgpt2 and TransformerLens differ by {diff:.2e} (values up to {scale:.2f})")
        gflop, typical = products_done(model, corrupted, clean_cache, metric, sweep)
        tl_gflop = result.size * full_forward_gflop(cfg, args.batch, args.tokens)
        print(f"{sweep:<28} {result.size:>6} {t_ours:>7.2f}s {t_theirs:>7.1f}s {t_theirs / t_ours:>5.1f}x "
              f"{diff:>9.1e} {gflop:>6.1f} {gflop / t_ours:>7.1f} {typical:>5} "
              f"{product_rate(max(typical, 1), cfg.d_model, cfg.d_mlp):>6.1f} {tl_gflop:>8.0f} {tl_gflop / t_theirs:>7.1f}",
              flush=True)
        worst.append((t_theirs / t_ours, sweep))
    if args.tl_sample:
        print(f"(TransformerLens timed on {args.tl_sample} random runs of each sweep, scaled to all its runs)")
    print(f"\nslowest against TransformerLens: {min(worst)[1]}, {min(worst)[0]:.1f}x (target >= 20x); "
          f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
