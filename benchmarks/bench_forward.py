"""Forward-pass speed and memory of npgpt2 against Hugging Face transformers, in one run.

On randomly initialised gpt2-small-shaped weights (written in the hub's layout), measures at 128
and 1024 tokens, batch 1:
  * npgpt2 forward (logits),
  * npgpt2 run_with_cache with every hook point (names_filter=None),
  * transformers' GPT2LMHeadModel forward, default attention (sdpa) and eager, when installed;
then the peak RSS of a full-cache run at 1024 tokens (in a fresh subprocess), and the time to load
the model from a local folder. Each is timed back to back (a warm-up, then --repeats runs) and the
median kept. Prints medians and the ratios to the targets:
  forward(1024) / transformers(1024) <= 1.0;  full cache(1024) / transformers(1024) <= 1.1;
  peak RSS of the full-cache run <= 2.5 GB;   load <= 0.3 s.

    python benchmarks/bench_forward.py [--repeats 7]

A note on virtual machines: where guest memory is backed lazily by the host (and free pages are
handed back to it), the first touch of memory the process has not used recently costs a host fault.
A full-cache run at 1024 tokens holds ~1.9 GB of fresh arrays, so on such a machine it runs far
slower when other work has run in between than back to back, as here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np

import npgpt2
from common import gpt2_small_folder, median_time


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
        print(f"transformers with torch {torch.__version__}, {torch.get_num_threads()} threads")
    except ImportError:
        hf = {}
        print("transformers/torch not installed: npgpt2 timings only (pip install -e '.[reference]')")

    rows = []
    for n in (128, 1024):
        tokens = np.random.default_rng(n).integers(0, cfg.d_vocab, (1, n))
        fns = {
            "npgpt2 forward": lambda: model(tokens),
            "npgpt2 run_with_cache (all hooks)": lambda: model.run_with_cache(tokens),
        }
        if hf:
            t_tokens = torch.from_numpy(tokens)
            fns.update({f"transformers forward ({impl})": (lambda m=m: m(t_tokens).logits)
                        for impl, m in hf.items()})
        for name, fn in fns.items():
            rows.append((n, name, median_time(fn, args.repeats)))

    print(f"\n{'tokens':>6}  {'what':<38} {'median s':>9}")
    for n, name, t in rows:
        print(f"{n:>6}  {name:<38} {t:>9.4f}")

    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, folder, "1024"], capture_output=True,
                         text=True, check=True).stdout.split()
    peak, before, cached = (int(x) for x in out)

    t = {(n, name): v for n, name, v in rows}
    print(f"\nload from a local folder: {load:.3f} s  (target <= 0.3 s)")
    print(f"peak RSS of a full-cache run at 1024 tokens: {peak / 1e9:.2f} GB (target <= 2.5 GB); "
          f"{before / 1e9:.2f} GB before the run, {cached / 1e9:.2f} GB of cached activations")
    if hf:
        for n in (128, 1024):
            ref = t[(n, "transformers forward (sdpa)")]
            eager = t[(n, "transformers forward (eager)")]
            fwd, full = t[(n, "npgpt2 forward")], t[(n, "npgpt2 run_with_cache (all hooks)")]
            print(f"{n:>5} tokens: forward / transformers = {fwd / ref:.2f} (sdpa), {fwd / eager:.2f} "
                  f"(eager); full cache / transformers = {full / ref:.2f} (sdpa), {full / eager:.2f} (eager)")
        print("targets at 1024 tokens: forward ratio <= 1.0, full-cache ratio <= 1.1")


if __name__ == "__main__":
    main()
