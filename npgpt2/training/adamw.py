"""AdamW for a ``GPT2``, with torch.optim.AdamW's semantics; global-norm gradient clipping; gradient
accumulation over micro-batches.

One step, for each parameter p with gradient g (torch.optim.AdamW, ``t`` counting from 1):

    p *= 1 - lr * weight_decay                      (decoupled weight decay; only decayed parameters)
    m += (1 - beta1) * (g - m)                      (m = beta1 m + (1 - beta1) g)
    v  = beta2 v + (1 - beta2) g^2
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

``eps`` is added after the bias correction of sqrt(v), as torch does (not inside the square root).

The parameters: ``AdamW(model)`` copies every weight of ``model.weights`` (read-only memory maps
after loading) into writable arrays of the model's dtype that it owns, and installs them as
``model.weights``. They are views into one long array (the decayed parameters first), as are the
two moments: a small model's update is then a few passes over three long arrays rather than a
dozen NumPy calls on each of its short ones. ``step`` updates them in place and then installs a
fresh ``GPT2Weights`` over the same arrays, so that the forward pass uses the new values at once and the TransformerLens
views (``model.W_Q`` ...) are rebuilt on their next access. The tied unembedding stays tied:
``W_U`` is ``W_E.T``, one parameter, updated once with the whole gradient (``grads.W_E``).

Parameter names are those of ``GPT2Weights.arrays()``: ``W_E``, ``W_pos``, ``blocks.{l}.W_qkv``,
``blocks.{l}.ln1_w`` ..., ``ln_final_w``, ``ln_final_b``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from typing import Callable, Iterable

import numpy as np

from ..threads import axpby, get_num_threads, worker_pool
from ..weights import BlockWeights, GPT2Weights

# elements per chunk of the update: the nine to thirteen passes of one chunk stay in the CPU's
# cache, so the arrays are read from memory about once; and each pass is long enough that calling it
# costs little (see benchmarks/bench_train.py)
_CHUNK = 1 << 19
_SHARED = 1 << 20  # parameters (numbers) from which the update is shared among the threads (on 2 cores
# the two cross near 700,000: 0.95 ms alone against 1.3 ms shared at 127,000; 5.4 against 4.0 at 2.6 million)


def named_parameters(weights) -> list[tuple[str, np.ndarray]]:
    """The trainable arrays of a ``GPT2Weights`` (or of its gradients), each once: the tied ``W_U``
    (a view of ``W_E``) is left out. A dict {name: array} passes through as its items."""
    if isinstance(weights, dict):
        return list(weights.items())
    tied = weights.tied()
    return [(name, a) for name, a in weights.arrays() if not (tied and name == "W_U")]


def default_decay(name: str, array: np.ndarray) -> bool:
    """Weight decay on 2-D weight matrices (W_E, W_pos, W_qkv, W_O, W_in, W_out), not on
    biases and layer-norm gains: the convention of nanoGPT and of GPT-2 fine-tuning."""
    return array.ndim >= 2


def clip_grad_norm(grads, max_norm: float, eps: float = 1e-6) -> float:
    """Scale the gradients in place so that their global norm is at most ``max_norm``; return the
    global norm before clipping (torch.nn.utils.clip_grad_norm_).

    The global norm is the 2-norm of all gradients as one vector (a tied gradient counted once).
    As in torch, every gradient is multiplied by min(1, max_norm / (norm + 1e-6)); a NaN or infinite
    norm is returned (the caller decides), and then the gradients become NaN, as torch's do.
    grads: a ``GPT2Weights`` of gradients (from ``value_and_grad``), a dict, or a list of arrays.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm}: expected a positive number")
    arrays = [a for a in grads] if isinstance(grads, (list, tuple)) else [a for _, a in named_parameters(grads)]
    norms = np.array([np.linalg.norm(a.reshape(-1)) for a in arrays])  # one norm per tensor, as torch
    total = float(np.linalg.norm(norms))
    coef = max_norm / (total + eps)
    if not coef >= 1.0:  # also when the norm is NaN: the gradients become NaN, as in torch
        for a in arrays:
            a *= a.dtype.type(coef)
    return total


def accumulate_grad(model, micro_batches: Iterable, metric=None):
    """(loss, grads) of the micro-batches together, one ``value_and_grad`` at a time: the mean loss
    over all predicted tokens and its gradient, the same as one ``value_and_grad`` of the batches
    stacked (each micro-batch is weighted by its number of predicted tokens, batch * (pos - 1)).
    Memory holds one micro-batch's activations and one set of gradients.
    """
    total_loss, total_grads, n_total = 0.0, None, 0
    for tokens in micro_batches:
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        n = tokens.shape[0] * (tokens.shape[1] - 1)
        loss, grads = model.value_and_grad(tokens, metric=metric)
        if total_grads is None:
            total_grads = grads
            for _, g in named_parameters(total_grads):
                g *= g.dtype.type(n)
        else:
            acc = dict(named_parameters(total_grads))
            for name, g in named_parameters(grads):
                acc[name] += g * g.dtype.type(n)
        total_loss += loss * n
        n_total += n
    if total_grads is None:
        raise ValueError("accumulate_grad: no micro-batches were given")
    for _, g in named_parameters(total_grads):
        g /= g.dtype.type(n_total)
    return total_loss / n_total, total_grads


class AdamW:
    """torch.optim.AdamW for a ``GPT2`` (see the module's docstring).

    lr: a float, or a schedule: a function of the number of steps already taken (0 for the first
        step) -> learning rate, e.g. ``training.warmup_cosine(3e-4, 100, 2000)``.
    betas, eps, weight_decay: as torch's (torch's default weight_decay is 0.01).
    decay: which parameters get weight decay: None (2-D matrices, ``default_decay``), a function
        (name, array) -> bool, or a collection of parameter names.
    """

    def __init__(self, model, lr: float | Callable[[int], float] = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01, decay=None):
        if not callable(lr) and not lr >= 0:
            raise ValueError(f"lr={lr}: expected a non-negative learning rate or a schedule")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas={betas}: expected two numbers in [0, 1)")
        if not eps >= 0 or not weight_decay >= 0:
            raise ValueError(f"eps={eps}, weight_decay={weight_decay}: expected non-negative numbers")
        if any(model.processing.values()):
            done = ", ".join(k for k, v in model.processing.items() if v)
            raise ValueError(f"the model's weights were processed ({done}): train the unprocessed model "
                             "(load it without fold_ln/center_*/fold_value_biases)")
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.t = 0  # steps taken
        named = named_parameters(model.weights)
        if decay is None:
            decay = default_decay
        if callable(decay):
            self.decayed = {name for name, p in named if decay(name, p)}
        else:
            self.decayed = set(decay)
            unknown = self.decayed - {name for name, _ in named}
            if unknown:
                raise ValueError(f"decay names unknown parameters {sorted(unknown)[:3]}; parameters are "
                                 f"named as GPT2Weights.arrays(), e.g. {[name for name, _ in named[:3]]}")
        # every parameter, and each of its two moments, is a view into one long array, laid out in
        # the same order, the decayed parameters first (``_layout``: [(name, start, stop)])
        self._layout = _layout(named, self.decayed)
        size = self._layout[-1][2]
        self._flat = {key: np.zeros(size, model.dtype) for key in ("p", "m", "v")}
        self.params = self._install(model)  # {name: writable array}, owned here, used by the model
        self.m, self.v = self._views("m"), self._views("v")
        self._g = np.empty(size, model.dtype) if size <= _SHARED else None  # a small model's gradients, in one array

    # ------------------------------------------------------------------------------- parameters
    def _views(self, key: str) -> dict[str, np.ndarray]:
        """{name: the parameter's part of flat array ``key``} ("p", "m" or "v"), in the model's order."""
        parts = {name: (start, stop) for name, start, stop in self._layout}
        return {name: self._flat[key][slice(*parts[name])].reshape(a.shape)
                for name, a in named_parameters(self.model.weights)}

    def _install(self, model) -> dict[str, np.ndarray]:
        """Writable copies of the model's weights (views into the flat array "p"), installed as
        ``model.weights``."""
        w = model.weights
        tied = w.tied()
        copy = self._views("p")
        for name, a in named_parameters(w):
            copy[name][...] = a
        blocks = [BlockWeights(**{f.name: copy.get(f"blocks.{l}.{f.name}") for f in dataclasses.fields(BlockWeights)})
                  for l in range(len(w.blocks))]
        model.weights = GPT2Weights(
            W_E=copy["W_E"], W_pos=copy["W_pos"], blocks=blocks, ln_final_w=copy.get("ln_final_w"),
            ln_final_b=copy.get("ln_final_b"), W_U=copy["W_E"].T if tied else copy["W_U"], b_U=copy.get("b_U"))
        return copy

    def _refresh_model(self) -> None:
        """Give the model a new ``GPT2Weights`` over the (updated) arrays: the views are rebuilt."""
        if self.model.weights.W_E is not self.params["W_E"]:
            raise ValueError("model.weights was replaced after this optimizer was made: make the optimizer "
                             "after loading or processing the weights")
        self.model.weights = dataclasses.replace(self.model.weights)

    def lr_at(self, t: int) -> float:
        """The learning rate of the step taken after ``t`` steps."""
        return float(self.lr(t)) if callable(self.lr) else float(self.lr)

    # ------------------------------------------------------------------------------------- step
    def step(self, grads) -> float:
        """One AdamW update from ``grads`` (a ``GPT2Weights`` of gradients, as ``value_and_grad``
        returns, or a dict {name: array}). Returns the learning rate used."""
        grads = dict(named_parameters(grads))
        missing = [n for n in self.params if n not in grads]
        if missing:
            raise ValueError(f"no gradient for {', '.join(missing[:3])}: expected one per parameter "
                             f"({len(self.params)})")
        lr = self.lr_at(self.t)
        self.t += 1
        beta1, beta2 = self.betas
        step_size = lr / (1 - beta1 ** self.t)
        bias_correction2_sqrt = math.sqrt(1 - beta2 ** self.t)
        for name, p in self.params.items():
            if grads[name].shape != p.shape:
                raise ValueError(f"gradient {name} has shape {list(grads[name].shape)}; expected {list(p.shape)}")
        decay = {True: 1 - lr * self.weight_decay, False: 1.0}
        flat = self._flat
        if self._g is not None:  # a small model: its gradients in one array too, the update a few long passes
            for name, start, stop in self._layout:
                self._g[start:stop] = grads[name].reshape(-1)
            pieces = [(flat["p"][a:b], self._g[a:b], flat["m"][a:b], flat["v"][a:b], decay[decayed])
                      for a, b, decayed in _runs(self._layout, self.decayed)]
        else:  # one piece a parameter (no copy of the gradients)
            pieces = [(p.reshape(-1), np.ascontiguousarray(grads[name], dtype=p.dtype).reshape(-1),
                       self.m[name].reshape(-1), self.v[name].reshape(-1), decay[name in self.decayed])
                      for name, p in self.params.items()]
        # (p, g, m, v, decay, start): independent pieces of the update, flat
        chunks = [piece + (start,) for piece in pieces for start in range(0, piece[0].size, _CHUNK)]
        # elementwise: the chunks spread over npgpt2's threads, in a few runs of consecutive chunks
        # (one hand-over to the pool per run, not per chunk)
        # (a small model's update stays on this thread: on short arrays, the threads would
        # mostly wait for Python's lock, which every NumPy call takes)
        runs = np.array_split(np.arange(len(chunks)), 1 if self._g is not None else min(len(chunks), 4 * get_num_threads()))
        fused = axpby(next(iter(self.params.values())).dtype)  # y = a x + b y in one pass, or None
        with worker_pool() as run:
            run(lambda r: [_update(*chunks[i], beta1, beta2, step_size, bias_correction2_sqrt, self.eps, fused)
                           for i in r], runs)
        self._refresh_model()
        return lr

    # -------------------------------------------------------------------------------- the state
    def state_dict(self) -> dict:
        """{"step", "betas", "eps", "weight_decay", "lr" (None for a schedule), "decay": [names],
        "m": {name: array}, "v": {name: array}}; the arrays are the optimizer's own (not copies)."""
        return {"step": self.t, "betas": list(self.betas), "eps": self.eps, "weight_decay": self.weight_decay,
                "lr": None if callable(self.lr) else self.lr, "decay": sorted(self.decayed),
                "m": self.m, "v": self.v}

    def load_state_dict(self, state: dict) -> None:
        """Take the step count, moments and hyperparameters of ``state_dict()`` (a learning-rate
        schedule stays as it is)."""
        for key in ("m", "v"):
            names = set(state[key])
            if names != set(self.params):
                diff = sorted(names ^ set(self.params))[:3]
                raise ValueError(f"optimizer state's {key} does not match the parameters (differ: {diff})")
            for name, p in self.params.items():
                if tuple(state[key][name].shape) != p.shape:
                    raise ValueError(f"optimizer state {key}[{name}] has shape {list(state[key][name].shape)}; "
                                     f"expected {list(p.shape)}")
        self.t = int(state["step"])
        self.betas, self.eps = tuple(state["betas"]), float(state["eps"])
        self.weight_decay = float(state["weight_decay"])
        if state.get("lr") is not None and not callable(self.lr):
            self.lr = float(state["lr"])
        self.decayed = set(state["decay"])
        for key in ("m", "v"):  # into the flat arrays' views
            for n, a in state[key].items():
                np.copyto(getattr(self, key)[n], a, casting="same_kind")

    def save(self, path: str) -> None:
        """Write the state to one safetensors file (tensors ``m.NAME``, ``v.NAME``; the numbers in
        its metadata). Never a pickle."""
        from safetensors.numpy import save_file

        state = self.state_dict()
        tensors = {f"{k}.{n}": np.ascontiguousarray(a) for k in ("m", "v") for n, a in state[k].items()}
        meta = {k: v for k, v in state.items() if k not in ("m", "v")}
        save_file(tensors, path, metadata={"npgpt2.adamw": json.dumps(meta)})

    def load(self, path: str) -> None:
        """Read a state written by ``save``."""
        from safetensors import SafetensorError, safe_open

        if not os.path.isfile(path):
            raise ValueError(f"{path} is missing: the checkpoint has no optimizer state to resume from")
        try:
            f = safe_open(path, framework="numpy")
        except SafetensorError as e:
            raise ValueError(f"{path} is damaged (truncated?): {e}") from None
        with f:
            meta = (f.metadata() or {}).get("npgpt2.adamw")
            if meta is None:
                raise ValueError(f"{path} holds no AdamW state (no 'npgpt2.adamw' metadata)")
            state = json.loads(meta)
            state["m"], state["v"] = {}, {}
            for key in f.keys():
                kind, name = key.split(".", 1)
                state[kind][name] = f.get_tensor(key)
        self.load_state_dict(state)


def _layout(named: list, decayed: set) -> list[tuple[str, int, int]]:
    """Where each parameter goes in the flat arrays: [(name, start, stop)], the decayed ones first
    (then a step's decay changes once along the array), each group in the model's order."""
    layout, start = [], 0
    for name, a in sorted(named, key=lambda item: item[0] not in decayed):  # (a stable sort)
        layout.append((name, start, start + a.size))
        start += a.size
    return layout


def _runs(layout: list, decayed: set) -> list[tuple[int, int, bool]]:
    """The flat arrays as runs of parameters that are all decayed or all not: [(start, stop, decayed)]
    (two runs, unless ``load_state_dict`` brought another choice of decayed parameters)."""
    runs = []
    for name, start, stop in layout:
        if runs and runs[-1][2] == (name in decayed):
            runs[-1] = (runs[-1][0], stop, runs[-1][2])
        else:
            runs.append((start, stop, name in decayed))
    return runs


def _update(p, g, m, v, decay, start, beta1, beta2, step_size, bias_correction2_sqrt, eps, fused=None) -> None:
    """torch's single-tensor AdamW on the chunk [start, start + _CHUNK) of flat arrays, in place.

    With ``fused``, BLAS's axpby (``threads.axpby``: y = a x + b y in one pass), nine passes over
    the chunk instead of thirteen:
        m = (1 - beta1) g + beta1 m
        v = (1 - beta2) g^2 + beta2 v
        p = decay p - step_size c m / (sqrt(v) + eps c),   c = bias_correction2_sqrt
    the last being torch's p -= step_size m / (sqrt(v) / c + eps) after its decay, multiplied
    through by c: the same numbers up to rounding. Without it, NumPy's passes below, where that line
    is p -= m / (sqrt(v) * (1 / (c * step_size)) + eps / step_size).
    """
    s = slice(start, start + _CHUNK)
    pc, gc, mc, vc = p[s], g[s], m[s], v[s]
    t = _scratch(pc.size, p.dtype)
    f = p.dtype.type
    if fused is not None:
        fused(1 - beta1, gc, beta1, mc)  # exp_avg.lerp_(grad, 1 - beta1)
        np.multiply(gc, gc, out=t)
        fused(1 - beta2, t, beta2, vc)  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if step_size == 0:  # lr 0 (the first step of a warm-up): the moments move, the parameters not
            return
        np.sqrt(vc, out=t)
        t += f(eps * bias_correction2_sqrt)
        np.divide(mc, t, out=t)
        fused(-step_size * bias_correction2_sqrt, t, decay, pc)  # param.mul_(decay).addcdiv_(...)
        return
    if decay != 1.0:
        pc *= f(decay)  # param.mul_(1 - lr * weight_decay)
    np.subtract(gc, mc, out=t)  # exp_avg.lerp_(grad, 1 - beta1)
    t *= f(1 - beta1)
    mc += t
    np.multiply(gc, gc, out=t)  # exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    t *= f(1 - beta2)
    vc *= f(beta2)
    vc += t
    if step_size == 0:  # lr 0 (the first step of a warm-up): the moments move, the parameters not
        return
    np.sqrt(vc, out=t)  # (sqrt(v) / bias_correction2_sqrt + eps) / step_size
    t *= f(1 / (bias_correction2_sqrt * step_size))
    t += f(eps / step_size)
    np.divide(mc, t, out=t)  # param.addcdiv_(exp_avg, denom, value=-step_size)
    pc -= t


_local = threading.local()


def _scratch(n: int, dtype) -> np.ndarray:
    """A work array of n elements for this thread, reused from one chunk to the next."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.dtype != dtype or buf.size < n:
        buf = _local.buf = np.empty(max(n, _CHUNK), dtype)
    return buf[:n]
