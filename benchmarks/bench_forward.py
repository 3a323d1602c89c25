"""Forward-pass speed and memory of npgpt2, against its own matrix-multiply floor and against
Hugging Face transformers, in one run.

On randomly initialised gpt2-small-shaped weights (written in the hub's layout), batch 1, at 128
and 1024 tokens, the functions taking turns (``common.interleaved``):
  * the floor: the matrix products the forward must do, on preallocated arrays
    (``common.matmul_products``: every linear layer, the unembedding, the causal half of q k^T and
    pattern v), what BLAS alone costs on this machine;
  * npgpt2 forward (logits), with its threads (``npgpt2.get_num_threads()``);
  * npgpt2 run_with_cache with every hook point (names_filter=None);
  * transformers' GPT2LMHeadModel forward, default attention (sdpa) and eager, when installed;
then the peak RSS of a full-cache run at 1024 tokens (in a fresh subprocess), and the time to load
the model from a local folder. Targets:
  forward / floor <= 1.15 at 1024 tokens, <= 1.25 at 128;  full cache / floor <= 1.5 at 1024;
  forward / transformers (sdpa) <= 0.9 at both;  peak RSS of the full-cache run below TransformerLens's
  (measured by bench_cache_memory.py);
  load <= 0.3 s.

    python benchmarks/bench_forward.py [--repeats 7]

A ratio to transformers depends on which BLAS each side got (numpy: OpenBLAS; torch: MKL); the
ratio to the floor compares npgpt2 with the same BLAS it runs on.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

import npgpt2
from common import describe_machine, gpt2_small_folder, interleaved, matmul_products


_RSS_CHILD = """
import sys, numpy as np, npgpt2

def peak_rss():  # VmHWM: this process's own high-water mark (ru_maxrss would include the parent's)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

model = npgpt2.from_pretrained(sys.argv[1])
tokens = np.random.default_rng(0).integers(0, model.cfg.d_vocab, (1, int(sys.argv[2])))
before = peak_rss()
logits, cache = model.run_with_cache(tokens)
print(peak_rss(), before, sum(a.nbytes for a in cache.values()))
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--folder", help="reuse a checkpoint folder (written if missing)")
    args = ap.parse_args(argv)
    print(describe_machine())
    print(f"npgpt2 threads: {npgpt2.get_num_threads()}")

    cfg = npgpt2.GPT2Config()  # gpt2-small: 12 layers, 12 heads, d_model 768
    folder = gpt2_small_folder(args.folder)

    load_times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        model = npgpt2.from_pretrained(folder)
        load_times.append(time.perf_counter() - t)
    load = float(np.median(load_times))

    try:
        import torch
        from transformers import GPT2LMHeadModel

        torch.set_grad_enabled(False)
        hf = {impl: GPT2LMHeadModel.from_pretrained(folder, attn_implementation=impl).eval()
              for impl in ("sdpa", "eager")}
    except ImportError:
        hf = {}
        print("transformers/torch not installed: npgpt2 timings only (pip install -e '.[reference]')")

    times = {}
    for n in (128, 1024):
        tokens = np.random.default_rng(n).integers(0, cfg.d_vocab, (1, n))
        fns = {
            "floor": matmul_products(cfg, n),  # in the same turns as the rest: the same state of the machine
            "forward": lambda: model(tokens),
            "full cache": lambda: model.run_with_cache(tokens),
        }
        if hf:
            t_tokens = torch.from_numpy(tokens)
            fns.update({f"transformers ({impl})": (lambda m=m: m(t_tokens).logits) for impl, m in hf.items()})
        for name, t in interleaved(fns, args.repeats).items():
            times[n, name] = t

    print(f"\n{'tokens':>6}  {'what':<40} {'median s':>9}")
    for (n, name), t in times.items():
        label = {"floor": "matrix-multiply floor (same BLAS)", "forward": "npgpt2 forward",
                 "full cache": "npgpt2 run_with_cache (all hooks)"}.get(name, name)
        print(f"{n:>6}  {label:<40} {t:>9.4f}")

    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, folder, "1024"], capture_output=True,
                         text=True, check=True).stdout.split()
    peak, before, cached = (int(x) for x in out)

    print(f"\nload from a local folder: {load:.3f} s  (target <= 0.3 s)")
    print(f"peak RSS of a full-cache run at 1024 tokens: {peak / 1e9:.2f} GB (target: below "
          f"TransformerLens's, benchmarks/bench_cache_memory.py); "
          f"{before / 1e9:.2f} GB before the run, {cached / 1e9:.2f} GB of cached activations")
    targets = {128: 1.25, 1024: 1.15}
    for n in (128, 1024):
        floor = times[n, "floor"]
        line = (f"{n:>5} tokens: forward / floor = {times[n, 'forward'] / floor:.2f} (target <= {targets[n]}); "
                f"full cache / floor = {times[n, 'full cache'] / floor:.2f}")
        line += " (target <= 1.5)" if n == 1024 else ""
        print(line)
        if hf:
            sdpa, eager = times[n, "transformers (sdpa)"], times[n, "transformers (eager)"]
            print(f"{'':>13} forward / transformers = {times[n, 'forward'] / sdpa:.2f} (sdpa; target <= 0.9), "
                  f"{times[n, 'forward'] / eager:.2f} (eager); full cache / transformers (sdpa) = "
                  f"{times[n, 'full cache'] / sdpa:.2f}")


if __name__ == "__main__":
    main()
