"""What the benchmark scripts share: the random gpt2-small-shaped checkpoint and a timer."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

import npgpt2
from npgpt2.testing import random_state_dict, write_checkpoint


def gpt2_small_folder(folder: str | None = None) -> str:
    """A folder with random gpt2-small-shaped weights in the hub's layout (written on first use)."""
    folder = folder or os.path.join(tempfile.gettempdir(), "npgpt2-bench-gpt2-small")
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        print(f"writing random gpt2-small-shaped weights to {folder} ...", flush=True)
        cfg = npgpt2.GPT2Config()
        write_checkpoint(folder, cfg, random_state_dict(cfg, seed=0))
    return folder


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
