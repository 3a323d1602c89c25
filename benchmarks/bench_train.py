"""One training step (forward, backward, clipping, AdamW) against torch, the AdamW update against the
memory floor, and peak memory against torch, in one run.

On randomly initialised gpt2-small-shaped weights (float32), measures:
  * npgpt2: ``value_and_grad`` + ``clip_grad_norm`` + ``AdamW.step``, at 1 x 1024 and 4 x 256 tokens;
  * torch: transformers' GPT2LMHeadModel (eval mode: no dropout; default attention), forward with
    labels, ``backward``, ``clip_grad_norm_``, ``torch.optim.AdamW.step`` (torch's defaults), the same
    shapes, torch's default threads;
  * the AdamW update alone (``AdamW.step`` on gpt2-small's 124M parameters) against the time to
    stream its arrays through memory once, measured here: for every parameter
    ``np.add(g, m, out=m); np.add(v, p, out=p)`` reads p, g, m and v once and writes two of them
    (the update itself also writes v, so this floor is a little lower than the true one);
  * the peak RSS (VmHWM) of two training steps at each shape, npgpt2 and torch, each in a fresh
    subprocess.
Prints medians and the ratios with their targets:
  step npgpt2 / torch <= 1.0;  peak RSS npgpt2 / torch <= 1.0. The AdamW update against the memory
  floor is printed without a target: NumPy cannot fuse the update (the square root alone runs at
  about 2.9 G elements/s on a 2-core EPYC), and the training step's ratio to torch is what a user feels.

    python benchmarks/bench_train.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import numpy as np

import npgpt2
from common import describe_machine, gpt2_small_folder, interleaved
from npgpt2 import training

SHAPES = [(1, 1024), (4, 256)]

_RSS_CHILD = """
import sys, numpy as np

def peak_rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))

folder, batch, n, which = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tokens = np.random.default_rng(0).integers(0, 50257, (batch, n))
if which == "npgpt2":
    import npgpt2
    from npgpt2 import training
    model = npgpt2.from_pretrained(folder)
    opt = training.AdamW(model, lr=1e-4)
    for _ in range(2):
        loss, grads = model.value_and_grad(tokens)
        training.clip_grad_norm(grads, 1.0)
        opt.step(grads)
        del grads
else:
    import torch
    from transformers import GPT2LMHeadModel
    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t = torch.from_numpy(tokens)
    for _ in range(2):
        model(t, labels=t).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
print(peak_rss())
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder", help="reuse a checkpoint folder (written if missing)")
    args = ap.parse_args(argv)
    folder = gpt2_small_folder(args.folder)
    print(describe_machine())

    model = npgpt2.from_pretrained(folder)
    opt = training.AdamW(model, lr=1e-5)  # small steps: the random model stays what it is

    def npgpt2_step(tokens):
        loss, grads = model.value_and_grad(tokens)
        training.clip_grad_norm(grads, 1.0)
        opt.step(grads)

    fns = {}
    for batch, n in SHAPES:
        tokens = np.random.default_rng(1).integers(0, 50257, (batch, n))
        fns[f"npgpt2 step {batch}x{n}"] = lambda tokens=tokens: npgpt2_step(tokens)
    have_torch = True
    try:
        import torch
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(folder).eval()
        t_opt = torch.optim.AdamW(hf.parameters(), lr=1e-5)

        def torch_step(t):
            hf(t, labels=t).loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            t_opt.step()
            t_opt.zero_grad(set_to_none=True)

        for batch, n in SHAPES:
            t = torch.from_numpy(np.random.default_rng(1).integers(0, 50257, (batch, n)))
            fns[f"torch step {batch}x{n}"] = lambda t=t: torch_step(t)
    except ImportError:
        have_torch = False
        print("transformers/torch not installed: npgpt2 timings only (pip install -e '.[reference]')")

    # the AdamW update alone, and the memory floor, on gradients of the right size
    _, grads = model.value_and_grad(np.random.default_rng(2).integers(0, 50257, (1, 64)))
    params = opt.params
    g = dict(training.named_parameters(grads))

    def stream_once():
        for name, p in params.items():
            np.add(g[name], opt.m[name], out=opt.m[name])
            np.add(opt.v[name], p, out=p)

    def stream_once_threaded():  # the same passes, in chunks over npgpt2's threads (as the update runs)
        from npgpt2.threads import worker_pool

        chunk = 1 << 17
        pieces = [(name, s) for name, p in params.items() for s in range(0, p.size, chunk)]

        def piece(item):
            name, s = item
            p, gn, m, v = (a.reshape(-1)[s:s + chunk] for a in (params[name], g[name], opt.m[name], opt.v[name]))
            np.add(gn, m, out=m)
            np.add(v, p, out=p)

        with worker_pool() as run:
            run(piece, pieces)

    fns["AdamW update"] = lambda: opt.step(grads)
    fns["memory floor"] = stream_once
    fns["memory floor, threads"] = stream_once_threaded

    times = interleaved(fns, args.repeats)  # taking turns (the warm-up allocates torch's optimizer state)

    n_params = sum(p.size for p in params.values())
    print(f"\ngpt2-small shape ({n_params / 1e6:.1f}M parameters, float32), median of {args.repeats}:")
    for name, t in times.items():
        print(f"  {name:<24} {t:8.3f} s")
    print()
    if have_torch:
        for batch, n in SHAPES:
            ratio = times[f"npgpt2 step {batch}x{n}"] / times[f"torch step {batch}x{n}"]
            print(f"training step {batch}x{n}: npgpt2 / torch = {ratio:.2f}  (target <= 1.0)")
    gb = n_params * 4 * 6 / 1e9  # bytes the floor moves: 4 arrays read, 2 written
    floor = min(times["memory floor"], times["memory floor, threads"])  # the faster way to stream them
    print(f"AdamW update / memory floor = {times['AdamW update'] / floor:.2f}  (no target: see the docstring; "
          f"floor {gb:.1f} GB in {floor:.3f} s = {gb / floor:.1f} GB/s, the faster of one thread "
          f"and {npgpt2.get_num_threads()})")

    for batch, n in SHAPES:
        peaks = {}
        for which in ("npgpt2", "torch") if have_torch else ("npgpt2",):
            out = subprocess.run([sys.executable, "-c", _RSS_CHILD, folder, str(batch), str(n), which],
                                 capture_output=True, text=True, check=True).stdout.split()
            peaks[which] = int(out[-1])
        line = ", ".join(f"{w} {p / 1e9:.2f} GB" for w, p in peaks.items())
        ratio = f"; npgpt2 / torch = {peaks['npgpt2'] / peaks['torch']:.2f}  (target <= 1.0)" if "torch" in peaks else ""
        print(f"peak RSS of two training steps at {batch}x{n}: {line}{ratio}")


if __name__ == "__main__":
    main()
