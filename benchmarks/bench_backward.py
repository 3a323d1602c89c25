"""The backward pass's speed and memory against npgpt2's own forward and against torch, in one run.

On randomly initialised gpt2-small-shaped weights, 1024 tokens, batch 1, measures:
  * npgpt2 forward (logits) and npgpt2 value_and_grad (the loss and every parameter's gradient);
  * transformers' GPT2LMHeadModel forward + loss.backward() (default attention, torch's default
    threads), when installed;
then the peak RSS of each gradient computation in a fresh subprocess. Prints medians and ratios
against the targets:
  value_and_grad / npgpt2 forward <= 3.0;  value_and_grad / torch forward+backward <= 1.0;
  peak RSS of value_and_grad <= torch's.

    python benchmarks/bench_backward.py [--repeats 5] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np

import npgpt2
from common import interleaved, describe_machine, gpt2_small_folder, median_time

_RSS_CHILD = """
import sys, numpy as np

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

folder, n, which = sys.argv[1], int(sys.argv[2]), sys.argv[3]
tokens = np.random.default_rng(0).integers(0, 50257, (1, n))
if which == "npgpt2":
    import npgpt2
    model = npgpt2.from_pretrained(folder)
    before = peak_rss()
    model.value_and_grad(tokens)
else:
    import torch
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    t = torch.from_numpy(tokens)
    before = peak_rss()
    model(t, labels=t).loss.backward()
print(peak_rss(), before)
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--folder", help="reuse a checkpoint folder (written if missing)")
    args = ap.parse_args(argv)
    folder = gpt2_small_folder(args.folder)
    print(describe_machine())

    model = npgpt2.from_pretrained(folder)
    tokens = np.random.default_rng(1).integers(0, model.cfg.d_vocab, (1, args.tokens))
    fns = {"npgpt2 forward": lambda: model(tokens), "npgpt2 value_and_grad": lambda: model.value_and_grad(tokens)}
    try:
        import torch
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(folder).eval()  # default attention (sdpa), no dropout
        t_tokens = torch.from_numpy(tokens)

        def torch_step():
            hf.zero_grad(set_to_none=True)
            hf(t_tokens, labels=t_tokens).loss.backward()

        fns["torch forward + backward"] = torch_step
    except ImportError:
        print("transformers/torch not installed: npgpt2 timings only (pip install -e '.[reference]')")
    times = interleaved(fns, args.repeats)  # taking turns: each sees the same machine

    print(f"\n{args.tokens} tokens, gpt2-small shape, median of {args.repeats}:")
    for name, t in times.items():
        print(f"  {name:<28} {t:8.3f} s")
    ratio = times["npgpt2 value_and_grad"] / times["npgpt2 forward"]
    print(f"\nvalue_and_grad / npgpt2 forward        = {ratio:.2f}  (target <= 3.0)")
    if "torch forward + backward" in times:
        ratio = times["npgpt2 value_and_grad"] / times["torch forward + backward"]
        print(f"value_and_grad / torch forward+backward = {ratio:.2f}  (target <= 1.0)")

    peaks = {}
    for which in ("npgpt2", "torch") if "torch forward + backward" in times else ("npgpt2",):
        out = subprocess.run([sys.executable, "-c", _RSS_CHILD, folder, str(args.tokens), which],
                             capture_output=True, text=True, check=True).stdout.split()
        peaks[which] = int(out[0])
        print(f"peak RSS, {which} gradient at {args.tokens} tokens: {peaks[which] / 1e9:.2f} GB "
              f"({int(out[1]) / 1e9:.2f} GB before it)")
    if "torch" in peaks:
        print(f"peak RSS npgpt2 / torch = {peaks['npgpt2'] / peaks['torch']:.2f}  (target <= 1.0)")


if __name__ == "__main__":
    main()
