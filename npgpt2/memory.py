"""Memory told before it is spent.

A forward pass of GPT-2 holds little beyond its weights: the residual stream, one layer's
intermediates, the logits. What a call is *asked to keep* is another matter: ``run_with_cache``
with every hook point keeps every layer's activations (about 16 GB for gpt2-xl at 1024 tokens,
most of it the attention patterns), a backward pass keeps what it reads, ``value_and_grad`` adds a
gradient for every weight. Asked for more than the machine has, the process grows until the
operating system kills it (a notebook's kernel dies) with nothing said.

So each call adds up, before its first allocation, what it will hold (``estimate``: from the
shapes of the hook points it keeps, the activations the backward pass saves, the weights'
gradients and the forward's working arrays) and compares it with the memory the machine has
available (``available_bytes``: Linux's MemAvailable). A call that would not fit raises
``NotEnoughMemory`` (a ``MemoryError``), naming the estimate, its largest parts and what to ask
for instead: a ``names_filter``, fewer tokens, a smaller batch.

    npgpt2.memory.estimate(model, batch=8, pos=1024, keep=names)   # -> Estimate: .total, .parts
    npgpt2.memory.available_bytes()                                  # None where unknown
    npgpt2.memory.enabled = False                                    # skip the check (at your own risk)

The estimate counts arrays, not the allocator's overhead or every NumPy temporary: on gpt2-small's
shape at 2 x 1024 tokens it says 4.37 GB for a full ``run_with_cache`` whose process peak rises by
4.25 GB, and 3.23 GB for a ``value_and_grad`` whose peak rises by 2.61 GB. The check refuses what
the machine cannot hold; ``enabled = False`` lets a call try anyway.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from functools import lru_cache

from .hooks import HOOK_POINTS

enabled = True  # set to False to run calls without the check
_CHECK_FROM = 256 << 20  # calls estimated below this need no look at the machine's memory
_SPECS = {spec.name: spec for spec in HOOK_POINTS}
_ON_REQUEST = frozenset(spec.name for spec in HOOK_POINTS if spec.on_request)  # made only when asked for


class NotEnoughMemory(MemoryError):
    """A call would hold more memory than the machine has available; raised before allocating."""


@dataclass
class Estimate:
    """What a call will hold, in bytes: ``parts`` {what: bytes}; ``total`` their sum;
    ``largest_kept`` the kept hook point kinds by size, largest first [(kind, bytes)]."""

    parts: dict
    largest_kept: list

    @property
    def total(self) -> int:
        return sum(self.parts.values())


def available_bytes() -> int | None:
    """The memory the machine can give this process now without swapping (Linux's MemAvailable),
    or its free physical pages elsewhere; None where neither can be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@lru_cache(maxsize=None)
def _kind(name: str) -> str:
    """"blocks.7.attn.hook_pattern" -> "blocks.{l}.attn.hook_pattern" (its HookSpec's name)."""
    return re.sub(r"^blocks\.\d+\.", "blocks.{l}.", name)


def _elements(dims: dict, kind: str, batch: int, pos: int, key_pos: int) -> int:
    """Elements of one activation of hook point kind ``kind`` (hooks.HOOK_POINTS' shapes)."""
    sizes = {"batch": batch, "pos": pos, "query_pos": pos, "key_pos": key_pos, "1": 1, **dims}
    n = 1
    for axis in _axes(kind):
        n *= sizes[axis]
    return n


@lru_cache(maxsize=None)
def _axes(kind: str) -> tuple[str, ...]:
    """"[batch, pos, d_model]" -> ("batch", "pos", "d_model"): the axes of hook point kind ``kind``."""
    return tuple(axis.strip() for axis in _SPECS[kind].shape.strip("[]").split(","))


def _dims(model) -> dict:
    """The model's sizes, read off its weights (plain attributes: the check runs inside every forward
    pass, and the debugger should not stop in a property on the way)."""
    W_E = model.weights.W_E  # [d_vocab, d_model]
    n_head = model.cfg.n_head
    return {"d_vocab": W_E.shape[0], "d_model": W_E.shape[1], "head": n_head, "d_head": W_E.shape[1] // n_head,
            "d_mlp": model.weights.blocks[0].W_in.shape[1], "n_layer": len(model.weights.blocks),
            "itemsize": W_E.dtype.itemsize}


def estimate(model, batch: int, pos: int, keep=(), save=(), keep_grad=(), param_grads: bool = False,
             key_pos: int | None = None) -> Estimate:
    """What a call of ``model`` on [batch, pos] tokens will hold (bytes, in the model's dtype):
    the activations it keeps (``keep``: hook point names), those the backward pass saves (``save``;
    attention patterns as the causal half the blockwise backward keeps), the gradients it keeps
    (``keep_grad``), the weights' gradients (``param_grads``), and the forward's working arrays (the
    residual stream, one layer's largest intermediates, the logits and their gradient).
    key_pos: keys each query may see (with a key/value cache, more than ``pos``)."""
    dims = _dims(model)
    itemsize = dims["itemsize"]
    key_pos = pos if key_pos is None else key_pos
    by_kind: dict[str, int] = {}
    parts = {}

    def add(names, part: str, saved: bool = False, skip=frozenset()):
        total = 0
        for name in names:
            kind = _kind(name)
            if name in skip or (saved and kind in _ON_REQUEST):
                continue  # (kept already; or, like hook_result, made only when someone asks for it)
            n = _elements(dims, kind, batch, pos, key_pos) * itemsize
            if saved and kind.endswith(("hook_pattern", "hook_attn_scores")):
                n //= 2  # (the blockwise backward keeps a causal half)
            total += n
            if part == "cached activations":
                by_kind[kind] = by_kind.get(kind, 0) + n
        if total:
            parts[part] = total

    add(keep, "cached activations")
    add(save, "activations saved for the backward pass", saved=True, skip=frozenset(keep))
    add(keep_grad, "cached gradients")
    if param_grads:
        parts["the weights' gradients"] = model.weights.n_params() * itemsize
    rows = batch * pos
    working = rows * dims["d_vocab"] * (2 if save else 1)  # the logits (and their gradient)
    working += rows * (4 * dims["d_model"] + 2 * dims["d_mlp"])  # residual stream, a layer's intermediates
    working += batch * dims["head"] * min(pos, 128) * key_pos  # one block of queries' scores
    parts["working arrays"] = working * itemsize
    largest = sorted(by_kind.items(), key=lambda kv: -kv[1])
    return Estimate(parts, largest)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def check(model, run, batch: int, pos: int, key_pos: int) -> None:
    """Raise ``NotEnoughMemory`` if the call ``run`` (hooks.Run) on [batch, pos] tokens would hold
    more than the machine has available; called before the forward pass allocates anything."""
    if not enabled:
        return
    e = estimate(model, batch, pos, run.keep, run.save, run.keep_grad, run.param_grads, key_pos)
    if e.total < _CHECK_FROM:
        return
    available = available_bytes()
    if available is None or e.total <= available:
        return
    parts = ", ".join(f"{what} {_gb(n)}" for what, n in sorted(e.parts.items(), key=lambda kv: -kv[1]))
    advice = ["fewer tokens or a smaller batch (the activations grow with batch x pos, the patterns with "
              "batch x pos x pos)"]
    if e.largest_kept:
        kinds = ", ".join(f"{kind.replace('{l}', '*')} {_gb(n)}" for kind, n in e.largest_kept[:3])
        advice.insert(0, f"a names_filter that keeps only what you need (the largest kept: {kinds})")
    if run.param_grads:
        advice.append("for gradients, micro-batches (npgpt2.training.accumulate_grad)")
    raise NotEnoughMemory(
        f"this call on {batch} x {pos} tokens ({model.name}, {model.cfg.n_layer} layers, {model.dtype}) would "
        f"hold about {_gb(e.total)} ({parts}), and this machine has {_gb(available)} available. Ask for less: "
        + "; ".join(advice) + ". (npgpt2.memory.enabled = False skips this check.)")
