"""Memory of a full activation cache: npgpt2 against TransformerLens 4.3, on the same weights.

At gpt2-small's and gpt2-medium's shapes (random weights in the hub's layout,
``common.random_checkpoint_folder``), batch 1, 1024 tokens, each side in its own child process,
one after the other:

  npgpt2         ``npgpt2.from_pretrained(folder)``, then ``run_with_cache(tokens)`` (every hook point
                 it computes; ``names_filter=None``);
  TransformerLens ``TransformerBridge.boot_transformers`` over transformers' ``GPT2LMHeadModel`` (the
                 way TransformerLens 4 loads GPT-2; ``HookedTransformer`` was removed in 4.0), then
                 ``run_with_cache(tokens)`` under ``torch.no_grad()`` (without it the autograd graph
                 would be kept too); no weight processing on either side.

For each: the process's resident memory after loading the model, its peak by the end of the run
(Linux's VmHWM, the same high-water mark as ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` but
without what a forked child inherits), the bytes of the cached arrays (each storage counted once)
and how many there are. Target: npgpt2's peak below TransformerLens's at both sizes.

    python benchmarks/bench_cache_memory.py [--sizes gpt2,gpt2-medium] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import current_rss, describe_machine, peak_rss, random_checkpoint_folder  # noqa: E402


def child(which: str, folder: str, n: int) -> dict:
    tokens = np.random.default_rng(0).integers(0, 50257, (1, n))
    if which == "npgpt2":
        import npgpt2

        model = npgpt2.from_pretrained(folder)
        model(tokens[:, :8])  # the weights' pages in, as the other side's are after loading
        loaded = current_rss()
        _, cache = model.run_with_cache(tokens)
        arrays = list(cache.values())
        stored = {}
        for a in arrays:  # each buffer once: some activations are views of another's
            while isinstance(a.base, np.ndarray):
                a = a.base
            stored[id(a)] = a.nbytes
        cached = sum(stored.values())
    else:
        import torch
        import transformers
        from transformer_lens.model_bridge import TransformerBridge

        transformers.utils.logging.disable_progress_bar()  # no 'Loading weights' bars in the table
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
        tok = transformers.GPT2TokenizerFast.from_pretrained(folder)
        model = TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok, dtype=torch.float32)
        with torch.no_grad():
            model(torch.from_numpy(tokens[:, :8]))
            loaded = current_rss()
            _, cache = model.run_with_cache(torch.from_numpy(tokens))
        arrays = list(cache.values())
        stored = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in arrays}
        cached = sum(stored.values())
    return {"loaded": loaded, "peak": peak_rss(), "cached": cached, "arrays": len(arrays)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="gpt2,gpt2-medium")
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--child", nargs=2, metavar=("WHICH", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.tokens)))
        return
    print(describe_machine())
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    print(f"\nrun_with_cache, every hook point, {args.tokens} tokens, batch 1 (GB)")
    print(f"{'size':<13}{'side':<17}{'loaded':>8}{'peak':>8}{'peak - loaded':>15}{'cached':>8}{'arrays':>8}")
    for size in args.sizes.split(","):
        folder = random_checkpoint_folder(size)
        peaks = {}
        for which in ("npgpt2", "TransformerLens"):
            cmd = [sys.executable, __file__, "--child", which, folder, "--tokens", str(args.tokens)]
            r = json.loads(subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout.splitlines()[-1])
            peaks[which] = r["peak"]
            print(f"{size:<13}{which:<17}{gb(r['loaded']):>8}{gb(r['peak']):>8}{gb(r['peak'] - r['loaded']):>15}"
                  f"{gb(r['cached']):>8}{r['arrays']:>8}", flush=True)
        ratio = peaks["npgpt2"] / peaks["TransformerLens"]
        print(f"{size:<13}npgpt2 / TransformerLens peak = {ratio:.2f} (target < 1){'' if ratio < 1 else '  MISSED'}")


if __name__ == "__main__":
    main()
