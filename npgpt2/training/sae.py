"""Training sparse autoencoders: the loss and its gradients written out by hand, Adam, a unit-norm
decoder, resampling of dead latents, and activations streamed from the model in bounded memory.

Loss on a batch x [n, d_in]:   L = mean_n ||x^ - x||^2  +  l1_coeff * mean_n sum_i f_i
(f >= 0, so sum_i f_i is the L1 norm; the decoder rows are kept at unit norm so that the penalty
cannot be dodged by shrinking f and growing W_dec).
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from .optim import Adam
from ..sae import SAE

PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def sae_loss_and_grads(params: dict[str, np.ndarray], x: np.ndarray, l1_coeff: float):
    """The loss, its parts, and dL/dparam for every parameter.  x: [n, d_in]

    Returns (loss, parts, grads) with parts = {"mse", "l1", "f", "err"}. The backward pass:
        x_c = x - b_dec;  pre = x_c W_enc + b_enc;  f = relu(pre);  x^ = f W_dec + b_dec
        dx^     = 2 (x^ - x) / n
        dW_dec  = f^T dx^                      db_dec  = sum_n dx^  (through the decoder)
        dpre    = (dx^ W_dec^T + l1_coeff / n) * [pre > 0]
        dW_enc  = x_c^T dpre                   db_enc  = sum_n dpre
        db_dec -= (sum_n dpre) W_enc^T         (x_c = x - b_dec; summing first saves a matmul)
    """
    W_enc, b_enc, W_dec, b_dec = (params[k] for k in PARAMS)
    n = x.shape[0]
    x_c = x - b_dec
    pre = x_c @ W_enc + b_enc  # [n, d_sae]
    f = np.maximum(pre, 0)
    err = f @ W_dec + b_dec - x  # [n, d_in]
    mse = float(np.einsum("nd,nd->", err, err) / n)
    l1 = float(f.sum() / n)

    d_out = err * (2.0 / n)
    grads = {"W_dec": f.T @ d_out}
    d_pre = d_out @ W_dec.T
    d_pre += l1_coeff / n
    d_pre *= pre > 0
    grads["W_enc"] = x_c.T @ d_pre
    grads["b_enc"] = d_pre.sum(0)
    grads["b_dec"] = d_out.sum(0) - grads["b_enc"] @ W_enc.T
    return mse + l1_coeff * l1, {"mse": mse, "l1": l1, "f": f, "err": err}, grads


def init_sae(d_in: int, d_sae: int, seed: int = 0, dtype=np.float32, b_dec=None) -> dict[str, np.ndarray]:
    """Unit-norm random decoder rows, the encoder their transpose, zero biases (b_dec may be given,
    e.g. the data mean)."""
    rng = np.random.default_rng(seed)
    W_dec = rng.standard_normal((d_sae, d_in))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    return {"W_enc": W_dec.T.astype(dtype).copy(), "b_enc": np.zeros(d_sae, dtype),
            "W_dec": W_dec.astype(dtype), "b_dec": (np.zeros(d_in) if b_dec is None else np.asarray(b_dec)).astype(dtype)}


def _project_out_parallel(W_dec: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Remove from each row of the gradient its component along that (unit) decoder row, so a step
    moves the row along the unit sphere instead of changing its norm."""
    return g - (g * W_dec).sum(1, keepdims=True) * W_dec


def resample_dead(params: dict, opt: Adam, dead: np.ndarray, x: np.ndarray, err: np.ndarray,
                  rng: np.random.Generator, scale: float = 0.2) -> int:
    """Give dead latents a new direction: an input the SAE reconstructs badly (drawn with probability
    proportional to its squared error), as a unit decoder row and as the encoder column at ``scale``
    times the mean norm of the live encoder columns, with a zero bias. Their Adam moments restart."""
    idx = np.flatnonzero(dead)
    if idx.size == 0:
        return 0
    weights = (err.astype(np.float64) ** 2).sum(1)
    p = weights / weights.sum() if weights.sum() > 0 else None
    rows = rng.choice(len(x), size=idx.size, replace=len(x) < idx.size, p=p)
    directions = x[rows] - params["b_dec"]
    directions /= np.linalg.norm(directions, axis=1, keepdims=True) + 1e-12
    alive = ~dead
    enc_norm = np.linalg.norm(params["W_enc"][:, alive], axis=0).mean() if alive.any() else 1.0
    params["W_dec"][idx] = directions
    params["W_enc"][:, idx] = (directions * (scale * enc_norm)).T
    params["b_enc"][idx] = 0
    opt.reset("W_dec", idx)
    opt.reset("W_enc", (slice(None), idx))
    opt.reset("b_enc", idx)
    return int(idx.size)


def train_sae(batches: Iterable[np.ndarray], d_sae: int, l1_coeff: float = 1e-3, lr: float = 1e-3,
              n_steps: int | None = None, resample_every: int | None = 1000, seed: int = 0,
              hook_name: str | None = None, progress: bool = True, init: dict | None = None,
              log_every: int = 10) -> tuple[SAE, pd.DataFrame]:
    """Train an SAE on a stream of activation batches [n, d_in] (e.g. ``activation_batches``).

    l1_coeff: sparsity penalty; lr: Adam learning rate; n_steps: stop after this many batches (else
    when the stream ends); resample_every: every this many steps, latents that did not fire during
    them are resampled (None: never); init: starting parameters (``init_sae``) instead of a random
    start with b_dec at the first batch's mean.

    Returns the SAE and a log (step, loss, mse, l1, l0, fve, dead_latents, resampled) every
    ``log_every`` steps.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    iterator = iter(batches)
    first = next(iterator, None)
    if first is None:
        raise ValueError("no activations to train on")
    first = np.asarray(first)
    params = {k: np.array(v) for k, v in init.items()} if init else init_sae(
        first.shape[-1], d_sae, seed, first.dtype, b_dec=first.mean(0))
    opt = Adam(lr)
    fired = np.zeros(d_sae, dtype=bool)  # since the last resampling check
    log, resampled = [], 0
    bar = tqdm(total=n_steps, desc="training SAE", disable=not progress, unit="batch")
    step = 0
    for x in _chain(first, iterator):
        if n_steps is not None and step >= n_steps:
            break
        x = np.asarray(x, dtype=params["W_enc"].dtype)
        loss, parts, grads = sae_loss_and_grads(params, x, l1_coeff)
        grads["W_dec"] = _project_out_parallel(params["W_dec"], grads["W_dec"])
        opt.step(params, grads)
        params["W_dec"] /= np.linalg.norm(params["W_dec"], axis=1, keepdims=True)
        active = parts["f"] > 0
        fired |= active.any(0)
        step += 1
        if resample_every and step % resample_every == 0:
            resampled = resample_dead(params, opt, ~fired, x, parts["err"], rng)
            fired[:] = False
        if step % log_every == 0 or step == 1:
            total = ((x - x.mean(0)) ** 2).sum()
            log.append({"step": step, "loss": loss, "mse": parts["mse"], "l1": parts["l1"],
                        "l0": float(active.sum(1).mean()), "fve": float(1 - (parts["err"] ** 2).sum() / total),
                        "dead_latents": int((~active.any(0)).sum()), "resampled": resampled})
            resampled = 0
            bar.set_postfix(loss=f"{loss:.4g}", l0=f"{log[-1]['l0']:.1f}")
        bar.update(1)
    bar.close()
    sae = SAE(**params, hook_name=hook_name, cfg={"l1_coeff": l1_coeff, "lr": lr, "steps": step})
    return sae, pd.DataFrame(log)


def _chain(first, rest):
    yield first
    yield from rest


def activation_batches(model, texts: Iterable[str], hook_name: str, batch_size: int = 4096,
                       buffer_size: int = 65536, texts_per_run: int = 16, prepend_bos: bool = True,
                       seed: int = 0) -> Iterator[np.ndarray]:
    """Stream shuffled batches [batch_size, d] of one activation over a corpus.

    Texts are run ``texts_per_run`` at a time; real (non-padding) positions go into a buffer of at
    most ``buffer_size`` rows, which is shuffled and drained in batches whenever it fills: memory
    stays bounded however long the corpus. Texts longer than n_ctx are cut to n_ctx tokens.
    """
    if hook_name not in model.hook_names():
        model.resolve_hook_names(hook_name)  # raises with suggestions
    rng = np.random.default_rng(seed)
    buffer: list[np.ndarray] = []
    held = 0
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) < texts_per_run:
            continue
        held = _collect(model, chunk, hook_name, prepend_bos, buffer, held)
        chunk = []
        while held >= buffer_size:
            block = np.concatenate(buffer)
            rng.shuffle(block)
            for start in range(0, len(block) - batch_size + 1, batch_size):
                yield block[start : start + batch_size]
            rest = block[len(block) - len(block) % batch_size :]
            buffer, held = ([rest], len(rest)) if len(rest) else ([], 0)
    if chunk:
        held = _collect(model, chunk, hook_name, prepend_bos, buffer, held)
    if held:
        block = np.concatenate(buffer)
        rng.shuffle(block)
        for start in range(0, len(block), batch_size):
            yield block[start : start + batch_size]


def _collect(model, texts, hook_name, prepend_bos, buffer, held) -> int:
    tokens, mask = model.to_tokens(texts, prepend_bos=prepend_bos, return_mask=True)
    tokens, mask = tokens[:, : model.cfg.n_ctx], mask[:, : model.cfg.n_ctx]
    _, cache = model.run_with_cache(tokens, names_filter=hook_name)
    acts = cache[hook_name][mask > 0]  # [real positions, d]
    buffer.append(acts)
    return held + len(acts)
