"""SAE training throughput at GPT-2 small's scale, against this machine's measured matmul peak.

d_in 768, 24576 latents, batches of 4096 activations: times full training steps (forward, the
hand-written backward pass, Adam, decoder renormalisation) and reports activations per second and
the fraction of the matmul peak reached. The peak is measured in the same run: the best of several
float32 [4096 x 768] @ [768 x 24576] products. A step does six such products (encode, decode, and
the gradients of W_dec, of the latents and of W_enc; db_dec needs only a vector-matrix product), so
its FLOP count is 6 * 2 * 4096 * 768 * 24576 plus lower-order terms.

    python benchmarks/bench_sae.py [--steps 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from npgpt2.training.optim import Adam
from npgpt2.training.sae import _project_out_parallel, init_sae, sae_loss_and_grads

D_IN, D_SAE, BATCH = 768, 24576, 4096


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, D_IN)).astype(np.float32)
    params = init_sae(D_IN, D_SAE, 0, np.float32)
    params["b_enc"] -= 0.3  # a realistic share of inactive latents

    a, b = x, params["W_enc"]
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    matmul_flops = 2 * BATCH * D_IN * D_SAE
    peak = matmul_flops / min(times)

    opt = Adam(1e-4)

    def step():
        loss, parts, grads = sae_loss_and_grads(params, x, 1e-3)
        grads["W_dec"] = _project_out_parallel(params["W_dec"], grads["W_dec"])
        opt.step(params, grads)
        params["W_dec"] /= np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
        return parts

    parts = step()  # warm-up (allocates Adam's moments)
    step_times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t)
    t_step = float(np.median(step_times))
    step_flops = 6 * matmul_flops
    t_grad = []
    for _ in range(3):
        t = time.perf_counter()
        sae_loss_and_grads(params, x, 1e-3)
        t_grad.append(time.perf_counter() - t)
    print(f"SAE d_in={D_IN}, d_sae={D_SAE}, batch={BATCH}, float32; L0 of this batch "
          f"{(parts['f'] > 0).sum(1).mean():.0f}")
    print(f"matmul peak measured: {peak / 1e9:.0f} GFLOP/s ([{BATCH}x{D_IN}] @ [{D_IN}x{D_SAE}], best of 5)")
    print(f"training step (forward + backward + Adam + renorm): {t_step:.3f} s median of {args.steps}")
    print(f"  {BATCH / t_step:,.0f} activations/s; {step_flops / t_step / 1e9:.0f} GFLOP/s = "
          f"{step_flops / t_step / peak:.0%} of the matmul peak")
    print(f"forward + backward alone: {min(t_grad):.3f} s = {step_flops / min(t_grad) / peak:.0%} of the peak")


if __name__ == "__main__":
    main()
