"""What the benchmark scripts share: random checkpoints of every GPT-2 size, timers, memory peaks."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

import npgpt2
from npgpt2.testing import random_state_dict, write_checkpoint


def random_checkpoint_folder(size: str = "gpt2", folder: str | None = None) -> str:
    """A folder with random weights of a published GPT-2 size (``npgpt2.config.KNOWN_SIZES``:
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl") in the hub's layout, written on first use
    (``model.safetensors``, ``config.json`` and the BPE files). Default place: the system's temporary
    folder, ``npgpt2-bench-{size}``. gpt2-xl's weights are 6.2 GB on disk and, while written, in
    memory: write it in a process that holds nothing else."""
    from npgpt2.config import KNOWN_SIZES

    if size not in KNOWN_SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(KNOWN_SIZES)}")
    name = "gpt2-small" if size == "gpt2" else size
    folder = folder or os.path.join(tempfile.gettempdir(), f"npgpt2-bench-{name}")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        print(f"writing random {name}-shaped weights to {folder} ...", flush=True)
        n_layer, n_head, n_embd = KNOWN_SIZES[size]
        cfg = npgpt2.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd)
        write_checkpoint(folder, cfg, random_state_dict(cfg, seed=0))
    return folder


def gpt2_small_folder(folder: str | None = None) -> str:
    """A folder with random gpt2-small-shaped weights in the hub's layout (written on first use)."""
    return random_checkpoint_folder("gpt2", folder)


def peak_rss() -> int:
    """This process's peak resident memory in bytes since it started or since ``reset_peak_rss()``
    (Linux's VmHWM; ``ru_maxrss`` would also count what a forked child shared with its parent)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def current_rss() -> int:
    """This process's resident memory now, in bytes (Linux's VmRSS)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def reset_peak_rss() -> None:
    """Start ``peak_rss()`` again from the memory held now (Linux: 5 into /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def median_time(fn, repeats: int, warmup: bool = True) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def describe_machine() -> str:
    """CPU model, core count, numpy's BLAS (and torch's, when installed): ratios depend on them."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        numpy_blas = f"{blas.get('name')} {blas.get('version', '')}".strip()
    except Exception:  # older numpy: no dict form
        numpy_blas = "unknown BLAS"
    line = f"CPU: {cpu}, {os.cpu_count()} cores; numpy {np.__version__} with {numpy_blas}"
    try:
        import torch

        mkl = "MKL" if torch.backends.mkl.is_available() else "no MKL"
        line += f"; torch {torch.__version__} ({mkl}, {torch.get_num_threads()} threads)"
    except ImportError:
        pass
    return line


def matmul_products(cfg, n_tokens: int, dtype=np.float32, query_block: int = 64):
    """A function that runs the matrix products a forward pass of ``n_tokens`` (batch 1) must do,
    back to back on preallocated arrays: every linear layer (q/k/v, attention output, MLP in and
    out) of every block, the unembedding, and the causal half of q k^T and pattern v (a block of
    ``query_block`` queries against the keys it may see, every head at once). No elementwise work,
    no fresh memory: what BLAS alone costs on this machine, the floor a forward pass is judged by.
    """
    rng = np.random.default_rng(0)
    d, h, dh, m, v = cfg.d_model, cfg.n_head, cfg.d_model // cfg.n_head, cfg.d_mlp, cfg.d_vocab
    x = rng.standard_normal((n_tokens, d)).astype(dtype)
    hidden = rng.standard_normal((n_tokens, m)).astype(dtype)
    weights = [rng.standard_normal(s).astype(dtype) * 0.02 for s in ((d, 3 * d), (d, d), (d, m), (m, d))]
    inputs = [x, x, x, hidden]
    outs = [np.empty((n_tokens, w.shape[1]), dtype) for w in weights]
    W_U = (rng.standard_normal((v, d)).astype(dtype) * 0.02).T  # tied: a transposed view, as GPT-2's
    logits = np.empty((n_tokens, v), dtype)
    q = rng.standard_normal((h, n_tokens, dh)).astype(dtype)
    k_t = rng.standard_normal((h, dh, n_tokens)).astype(dtype)
    vv = rng.standard_normal((h, n_tokens, dh)).astype(dtype)
    scores = np.empty((h, query_block * n_tokens), dtype)
    z = np.empty((h, n_tokens, dh), dtype)

    def products():
        for _ in range(cfg.n_layer):
            for a, w, o in zip(inputs, weights, outs):
                np.matmul(a, w, out=o)
            for start in range(0, n_tokens, query_block):
                stop = min(start + query_block, n_tokens)
                s = scores[:, : (stop - start) * stop].reshape(h, stop - start, stop)
                np.matmul(q[:, start:stop], k_t[:, :, :stop], out=s)
                np.matmul(s, vv[:, :stop], out=z[:, start:stop])
        np.matmul(x, W_U, out=logits)

    return products


def weight_read_floor(model, repeats: int) -> float:
    """Median time to read every weight matrix once: a one-row product with each (q/k/v, attention
    output, MLP in and out of every block, and the unembedding) into preallocated outputs, what one
    new token of generation must at least do. Bound by memory bandwidth."""
    w = model.weights
    mats = [m for b in w.blocks for m in (b.W_qkv, b.W_O, b.W_in, b.W_out)] + [w.W_U]
    rows = [np.ones((1, m.shape[0]), m.dtype) for m in mats]
    outs = [np.empty((1, m.shape[1]), m.dtype) for m in mats]

    def read():
        for x, m, o in zip(rows, mats, outs):
            np.matmul(x, m, out=o)

    return median_time(read, repeats)


SETTLE = 0.25  # seconds of quiet before each timed call in ``interleaved``


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median time of each ``fns[name]()``, the functions taking turns (one warm-up each first), so
    that each sees the same state of the machine: on a virtual machine the cost of memory drifts
    from minute to minute, and a neighbour's load comes and goes.

    Each timed call starts after ``SETTLE`` seconds of quiet. After a multi-threaded product,
    OpenBLAS's idle threads spin for about 0.1 s before they sleep (torch's OpenMP threads do the
    like): a function timed right after another's products would share the cores with them (a
    128-token forward pass: 230 ms after a pause, 280 ms right after a 2-thread product)."""
    for fn in fns.values():
        fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(SETTLE)
            samples[name].append(median_time(fn, 1, warmup=False))
    return {name: float(np.median(s)) for name, s in samples.items()}
