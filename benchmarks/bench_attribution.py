"""Attribution patching and edge attribution against exact patching, in one run.

On randomly initialised gpt2-small-shaped weights (12 layers), IOI-length prompts of 15 tokens:
  * every attribution sweep at once (``get_attr_patch_all``) in forward-pass equivalents
    (target <= 4), and against the exact sweeps of the same sizes (target >= 20x faster);
  * ``edge_attribution`` on all 32,491 edges for 8 prompts: EAP (target <= 5 forward passes) and
    EAP-IG with 5 steps (target <= 15).
A forward-pass equivalent is the median time of a plain forward of the same batch.

    python benchmarks/bench_attribution.py [--repeats 3] [--exact-sweeps resid_pre,attn_head_out_all_pos]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import npgpt2
from common import describe_machine, gpt2_small_folder, median_time
from npgpt2.analysis import patching
from npgpt2.analysis.edges import edge_attribution


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder", help="reuse a checkpoint folder (written if missing)")
    ap.add_argument("--exact-sweeps", default="resid_pre,attn_out,mlp_out,attn_head_out_all_pos",
                    help="exact sweeps to time against their estimates (comma-separated names)")
    args = ap.parse_args(argv)
    print(describe_machine())
    model = npgpt2.from_pretrained(gpt2_small_folder(args.folder))
    rng = np.random.default_rng(0)

    # attribution patching: one prompt pair of 15 tokens
    clean = rng.integers(0, 50257, (1, 15))
    corrupted = clean.copy()
    corrupted[:, [2, 9]] = rng.integers(0, 50257, (1, 2))
    _, clean_cache = model.run_with_cache(clean)
    metric = patching.logit_diff_metric(11, 12)
    forward = median_time(lambda: model(corrupted), args.repeats)
    every = median_time(lambda: patching.get_attr_patch_all(model, corrupted, clean_cache, metric), args.repeats)
    print(f"\n15 tokens, batch 1: forward {forward * 1e3:.1f} ms")
    print(f"every attribution sweep at once: {every * 1e3:.1f} ms = {every / forward:.2f} forward passes (target <= 4)")
    exact_total, attr_total = 0.0, 0.0
    for name in args.exact_sweeps.split(","):
        exact_fn, attr_fn = getattr(patching, f"get_act_patch_{name}"), getattr(patching, f"get_attr_patch_{name}")
        t = time.perf_counter()
        exact_fn(model, corrupted, clean_cache, metric, progress=False)
        exact = time.perf_counter() - t
        attr = median_time(lambda: attr_fn(model, corrupted, clean_cache, metric), args.repeats)
        exact_total += exact
        attr_total += attr
        print(f"  {name:<28} exact {exact:8.2f} s   attribution {attr * 1e3:8.1f} ms   {exact / attr:7.1f}x")
    print(f"these sweeps one by one: attribution {exact_total / attr_total:.1f}x faster than exact (target >= 20x)")
    print(f"these exact sweeps against every attribution sweep at once: {exact_total / every:.1f}x")

    # edge attribution: 8 prompts of 15 tokens
    clean8 = rng.integers(0, 50257, (8, 15))
    corrupted8 = clean8.copy()
    corrupted8[:, [2, 9]] = rng.integers(0, 50257, (8, 2))
    forward8 = median_time(lambda: model(corrupted8), args.repeats)
    eap = median_time(lambda: edge_attribution(model, clean8, corrupted8, metric), args.repeats)
    eap_ig = median_time(lambda: edge_attribution(model, clean8, corrupted8, metric, method="eap-ig", ig_steps=5),
                         args.repeats)
    print(f"\n8 prompts x 15 tokens, 32,491 edges: forward {forward8 * 1e3:.1f} ms")
    print(f"EAP    {eap * 1e3:8.1f} ms = {eap / forward8:5.2f} forward passes (target <= 5)")
    print(f"EAP-IG {eap_ig * 1e3:8.1f} ms = {eap_ig / forward8:5.2f} forward passes, 5 steps (target <= 15)")


if __name__ == "__main__":
    main()
