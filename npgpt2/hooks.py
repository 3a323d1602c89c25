"""Hook points and run state: which activations have names, who listens to them, what a call keeps.

The forward pass (model.py) hands every named activation to ``run(name, array)`` and goes on with
what comes back. ``run`` is a ``Run``: the state of *one* call of the model, made when the call
starts and dropped when it ends:

* the hook functions that call fires (the model's own, those of an enclosing ``model.hooks()``
  block in this thread, and those passed to ``run_with_hooks`` or ``generate``);
* the activations it keeps, for ``run_with_cache``.

Because that state belongs to the call and not to the model, two threads can run one model at once,
and a hook may itself call the model (nested calls keep their own caches and hooks).

Three places a hook can live, from widest to narrowest:

``model.add_hook(name, fn)``
    model-wide, every call in every thread, until ``model.reset_hooks()``
    (``add_perma_hook`` / ``is_permanent=True``: until ``reset_hooks(including_permanent=True)``);
``with model.hooks([(name, fn)]):``
    calls made inside the block, in this thread (a ``contextvars`` context);
``model.run_with_hooks(x, fwd_hooks=[(name, fn)])``, ``run_with_cache``, ``generate(fwd_hooks=...)``
    that one call (for a generation stream, the steps it computes).

As in TransformerLens 4, ``run_with_hooks`` and ``hooks()`` remove only the hooks they added: hooks
added with ``add_hook`` before (or inside) the call stay on the model, and keep firing afterwards.

``HOOK_POINTS`` (names.py) is the one list of hook names: the model, the cache's short names,
patching and the README's table are all made from it.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import re
import threading
import weakref
from typing import Callable, Iterable

import numpy as np

from .cache import ActivationCache
# the hook points' names live in names.py; they are importable from here too, as before
from .names import (HOOK_POINTS, SHORT_ALIASES, HookSpec, block_hook, get_act_name, hook_names,  # noqa: F401
                    markdown_table, short_names)

HookFn = Callable[[np.ndarray, "HookPoint"], "np.ndarray | None"]


class HookError(ValueError):
    """A hook name that does not exist, or a hook that returned an array of the wrong shape."""


class HookPoint:
    """The second argument a hook function receives: which activation it is looking at.

    ``ctx`` is a dict that belongs to this hook point of this model and lasts across calls (as in
    TransformerLens): a hook may keep things there between calls. ``model.reset_hooks()`` empties
    every ``ctx`` (``clear_contexts=False`` keeps them); ``model.clear_contexts()`` does only that.
    """

    __slots__ = ("name", "ctx", "_model")

    def __init__(self, name: str, model=None):
        self.name = name
        self.ctx: dict = {}
        self._model = weakref.ref(model) if model is not None else None  # (the model holds its points)

    def add_hook(self, fn: HookFn, dir: str = "fwd", is_permanent: bool = False) -> None:
        """TransformerLens's ``hook_point.add_hook(fn)``: ``model.add_hook(self.name, fn, ...)``."""
        model = self._model() if self._model is not None else None
        if model is None:
            raise HookError(f"{self.name} belongs to no model: add the hook with model.add_hook({self.name!r}, fn)")
        model.add_hook(self.name, fn, dir=dir, is_permanent=is_permanent)

    def add_perma_hook(self, fn: HookFn, dir: str = "fwd") -> None:
        """``add_hook(fn, is_permanent=True)``."""
        self.add_hook(fn, dir=dir, is_permanent=True)

    def __getattr__(self, name: str):
        if name in ("remove_hooks", "fwd_hooks", "bwd_hooks"):
            raise AttributeError(f"npgpt2 keeps hooks on the model: model.reset_hooks() removes them; "
                                 f"model.run_with_hooks(..., fwd_hooks=[({self.name!r}, fn)]) or model.hooks(...) "
                                 "add hooks for one call or block")
        raise AttributeError(f"HookPoint has no attribute {name!r} (it has name, ctx, layer(), add_hook())")

    def layer(self) -> int | None:
        """The block index for ``blocks.{l}...`` names, else None."""
        m = re.match(r"blocks\.(\d+)\.", self.name)
        return int(m.group(1)) if m else None

    def __repr__(self):
        return f"HookPoint({self.name!r})"


# ----------------------------------------------------------------------------------------------
# The state of one call
# ----------------------------------------------------------------------------------------------
class Run:
    """One call of the model: the hooks it fires and the activations (and gradients) it keeps.

    The forward pass calls it at every hook point: ``resid_pre = run("blocks.0.hook_resid_pre", x)``.
    When the call computes gradients, the backward pass (backward.py) calls ``run.grad(name, d_act)``
    at the same points in reverse, and reads what the forward saved for it in ``run.saved``.
    """

    __slots__ = ("hooks", "points", "keep", "cache", "bwd_hooks", "keep_grad", "save", "saved", "changed",
                 "given", "param_grads", "tape")

    def __init__(self, hooks: dict[str, list[HookFn]], points: dict[str, HookPoint],
                 keep: frozenset[str] = frozenset(), bwd_hooks: dict[str, list[HookFn]] | None = None,
                 keep_grad: frozenset[str] = frozenset(), save: frozenset[str] = frozenset()):
        self.hooks = hooks  # {name: [fn, ...]}, fixed for the whole call
        self.points = points
        self.keep = keep  # names whose activations are cached
        self.cache: dict[str, np.ndarray] = {}
        self.bwd_hooks = bwd_hooks or {}  # {name: [fn, ...]} fired on the gradient at that point
        self.keep_grad = keep_grad  # names whose gradients are cached, as "{name}_grad"
        self.save = save  # names whose activations the backward pass needs
        self.saved: dict[str, np.ndarray] = {}
        self.changed: dict[str, np.ndarray] = {}  # where a forward hook changed a saved point's value
        self.given: dict[str, np.ndarray] = {}  # and what the forward had computed there
        self.param_grads = False  # does the backward compute the weights' gradients too?
        self.tape = None  # what fast.py kept for the backward, when it ran the blocks

    def __call__(self, name: str, act: np.ndarray) -> np.ndarray:
        fns = self.hooks.get(name)
        if fns:
            given = act
            for fn in fns:
                out = fn(act, self.points[name])
                if out is not None:
                    act = _checked_replacement(name, act, out)
            if self.save and act is not given:
                self.changed[name] = act != given
                self.given[name] = given
        if name in self.keep:
            self.cache[name] = act
        if name in self.save:
            self.saved[name] = act
        return act

    def grad(self, name: str, d_act: np.ndarray) -> np.ndarray:
        """At a hook point on the way back: fire the backward hooks on the gradient with respect to
        the activation, keep it if asked, and return the gradient that flows on to what computed it.

        npgpt2 cannot differentiate a forward hook's function: where a forward hook changed an
        activation's value, the new value counts as a constant, and no gradient flows back through
        those entries (as with torch's ``detach``); where it left the value alone, it flows on.
        """
        fns = self.bwd_hooks.get(name)
        if fns:
            outer, _in_backward_hook.name = getattr(_in_backward_hook, "name", None), name
            try:
                for fn in fns:
                    out = fn(d_act, self.points[name])
                    if out is not None:
                        d_act = _checked_replacement(name, d_act, out)
            finally:
                _in_backward_hook.name = outer
        if name in self.keep_grad:
            self.cache[name + "_grad"] = d_act
        changed = self.changed.get(name)
        return d_act if changed is None else np.where(changed, 0, d_act)

    def private(self, name: str) -> bool:
        """Is the gradient that passed ``name`` held by no one else (not cached, no backward hook
        saw it)? Then the backward pass may reuse its memory."""
        return name not in self.keep_grad and name not in self.bwd_hooks

    def computed(self, name: str) -> np.ndarray:
        """The value the forward pass computed at a saved point, before any hook changed it (what
        the derivative of the function that computed it is taken at)."""
        return self.given.get(name, self.saved[name])

    def idle(self) -> bool:
        """Does nobody look inside this call (no hook in either direction, no cache)? Then the model
        may take its fast path (fast.py), which keeps what a backward pass reads on a tape when the
        call asks for gradients."""
        return not (self.hooks or self.keep or self.bwd_hooks or self.keep_grad)

    def hooked(self, *names: str) -> bool:
        """Does a forward hook function run at one of these names (and so may change its value)?"""
        return any(name in self.hooks for name in names)

    def wants(self, *names: str) -> bool:
        """Does anyone look at one of these names, or its gradient? (for activations computed only
        on request)"""
        return any(name in self.hooks or name in self.keep or name in self.bwd_hooks or name in self.keep_grad
                   for name in names)


def _checked_replacement(name: str, act: np.ndarray, out) -> np.ndarray:
    out = np.asarray(out)
    if out.shape != act.shape:
        raise HookError(f"hook on {name} returned shape {out.shape}; expected {act.shape} "
                        "(the shape it was given)")
    return out.astype(act.dtype, copy=False)


# (model, direction, name, fn) of the enclosing ``model.hooks()`` blocks, in this thread / context
_SCOPED: contextvars.ContextVar[tuple] = contextvars.ContextVar("npgpt2_scoped_hooks", default=())

_DIRECTIONS = ("fwd", "bwd")

# the backward hook this thread is running, if any: a backward pass may not start inside one
_in_backward_hook = threading.local()


def check_not_in_backward_hook(caller: str) -> None:
    """Refuse to start a backward pass from inside a backward hook: with the hook still registered
    the inner pass would run it again, and that one again, without end."""
    name = getattr(_in_backward_hook, "name", None)
    if name is not None:
        raise HookError(f"{caller} was called from inside a backward hook at {name}: a backward pass cannot "
                        "start within another's hook (it would run that hook again, without end); "
                        "compute what the hook needs before the call, or after it")


class HookedModel:
    """The hook half of ``GPT2``: registering hooks and making the ``Run`` of each call.

    Expects ``self.cfg`` (for the number of layers), ``_forward(run, input, ...)`` (model.py) and,
    for the gradient API, ``_backward_run(run, input, metric, ...)`` (backward.py).
    """

    def _init_hooks(self) -> None:
        self._hook_names = hook_names(self.cfg.n_layer)
        self._points = {n: HookPoint(n, self) for n in self._hook_names}
        on_request = tuple(s.name.split("}.", 1)[-1] for s in HOOK_POINTS if s.on_request)
        self._computed_anyway = frozenset(n for n in self._hook_names if not n.endswith(on_request))
        # the hook points whose activations the backward pass reads
        ends = ("hook_scale", "hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "mlp.hook_pre", "mlp.hook_post")
        self._saved_for_backward = frozenset(n for n in self._hook_names if n.endswith(ends))
        # Model-wide hooks, per direction. Replaced, never mutated, under the lock: a call reads one
        # consistent dict. ``_registered`` remembers which were added as permanent.
        self._hooks: dict[str, list[HookFn]] = {}
        self._bwd_hooks: dict[str, list[HookFn]] = {}
        self._registered: tuple[tuple[str, str, HookFn, bool], ...] = ()  # (dir, name, fn, permanent)
        self._hooks_lock = threading.Lock()

    def _new_run(self, extra: Iterable[tuple[str, HookFn]] = (), keep: frozenset[str] = frozenset(),
                 bwd_extra: Iterable[tuple[str, HookFn]] = (), keep_grad: frozenset[str] = frozenset(),
                 save: frozenset[str] = frozenset()) -> Run:
        """The state of one call: the model's hooks, then this context's, then ``extra``."""
        scoped = _SCOPED.get()
        hooks = _merged(self._hooks, [(n, fn) for m, d, n, fn in scoped if m is self and d == "fwd"], extra)
        bwd = _merged(self._bwd_hooks, [(n, fn) for m, d, n, fn in scoped if m is self and d == "bwd"],
                      bwd_extra)
        return Run(hooks, self._points, keep, bwd, keep_grad, save)

    def hook_names(self) -> list[str]:
        """Every hook point, in the order the forward pass reaches them."""
        return list(self._hook_names)

    def resolve_hook_names(self, names) -> list[str]:
        """A name, a list of names, or a predicate on names -> the matching hook names.

        Unknown names raise ``HookError`` with the closest real names.
        """
        if names is None:
            return list(self._hook_names)
        if callable(names):
            return [n for n in self._hook_names if names(n)]
        if isinstance(names, str):
            names = [names]
        names = list(names)
        for n in names:
            if n not in self._points:
                close = difflib.get_close_matches(str(n), self._hook_names, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else "; see model.hook_names()"
                raise HookError(f"unknown hook point {n!r}{hint}")
        return names

    def _expand(self, hooks: Iterable[tuple]) -> list[tuple[str, HookFn]]:
        """[(name, list of names or predicate, fn)] -> [(name, fn)], every name and fn checked."""
        pairs = []
        for item in hooks:
            if not isinstance(item, (tuple, list)) or len(item) != 2:
                raise HookError(f"a hook is a (name, function) pair; got {item!r}")
            name, fn = item
            if not callable(fn):
                raise HookError(f"hook for {name!r} is {type(fn).__name__}, not a function")
            pairs += [(n, fn) for n in self.resolve_hook_names(name)]
        return pairs

    def add_hook(self, name, fn: HookFn, dir: str = "fwd", is_permanent: bool = False) -> None:
        """Register ``fn(activation, hook)`` (``dir="fwd"``) or ``fn(gradient, hook)`` (``dir="bwd"``)
        at a name (or every name a predicate accepts), for every later call of the model, in every
        thread. A backward hook fires in the calls that compute gradients. A permanent hook
        (``is_permanent=True``, or ``add_perma_hook``) survives ``reset_hooks()``."""
        if dir not in _DIRECTIONS:
            raise HookError(f"dir={dir!r}: expected 'fwd' or 'bwd'")
        pairs = self._expand([(name, fn)])
        with self._hooks_lock:
            self._set_registered(self._registered + tuple((dir, n, f, bool(is_permanent)) for n, f in pairs))

    def add_perma_hook(self, name, fn: HookFn, dir: str = "fwd") -> None:
        """``add_hook(..., is_permanent=True)``: a hook that only ``reset_hooks(including_permanent=True)``
        removes (TransformerLens's name)."""
        self.add_hook(name, fn, dir=dir, is_permanent=True)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both",
                    including_permanent: bool = False) -> None:
        """Remove the hooks added with ``add_hook`` (forward and backward with ``direction="both"``),
        except permanent ones unless ``including_permanent=True``; with ``clear_contexts`` (the
        default, as in TransformerLens) also empty every hook point's ``ctx``."""
        if direction not in ("fwd", "bwd", "both"):
            raise HookError(f"direction={direction!r}: expected 'fwd', 'bwd' or 'both'")
        with self._hooks_lock:
            self._set_registered(tuple(r for r in self._registered
                                       if not (direction in (r[0], "both") and (including_permanent or not r[3]))))
        if clear_contexts:
            self.clear_contexts()

    def clear_contexts(self) -> None:
        """Empty every hook point's ``ctx`` dict."""
        for point in self._points.values():
            point.ctx.clear()

    def _set_registered(self, registered: tuple) -> None:
        """Replace the model-wide hooks (call with the lock held): new dicts, never edited in place."""
        self._registered = registered
        self._hooks = _merged({}, [(n, fn) for d, n, fn, _ in registered if d == "fwd"])
        self._bwd_hooks = _merged({}, [(n, fn) for d, n, fn, _ in registered if d == "bwd"])

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """{name: HookPoint} for every hook point (TransformerLens's ``model.hook_dict``); each
        HookPoint has its ``name`` and ``ctx``. Hooks are added through the model, not the point."""
        return dict(self._points)

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple] = (), bwd_hooks: Iterable[tuple] = (),
              reset_hooks_end: bool = True, clear_contexts: bool = False):
        """Context manager: the hooks fire in calls made inside the block, in this thread, and are
        gone on leaving it, even when the block raises. With ``reset_hooks_end=False`` they are
        added to the model for good instead (``add_hook``), as TransformerLens does.

        Only the hooks given here go away on leaving: a hook added with ``add_hook`` inside the
        block stays on the model (TransformerLens 4's rule). ``model.add_hook`` is model-wide, so
        it fires in every thread, not only this block's. ``clear_contexts=True`` empties every hook
        point's ``ctx`` on leaving."""
        added = [("fwd", n, fn) for n, fn in self._expand(fwd_hooks)]
        added += [("bwd", n, fn) for n, fn in self._expand(bwd_hooks)]
        if not reset_hooks_end:
            for d, n, fn in added:
                self.add_hook(n, fn, dir=d)
            try:
                yield self
            finally:
                if clear_contexts:
                    self.clear_contexts()
            return
        token = _SCOPED.set(_SCOPED.get() + tuple((self, d, n, fn) for d, n, fn in added))
        try:
            yield self
        finally:
            _SCOPED.reset(token)
            if clear_contexts:
                self.clear_contexts()

    def run_with_hooks(self, input, fwd_hooks: Iterable[tuple] = (), bwd_hooks: Iterable[tuple] = (),
                       return_type="logits", reset_hooks_end: bool = True, metric=None,
                       clear_contexts: bool = False, **kwargs):
        """``forward`` with ``fwd_hooks`` = [(name or predicate, fn), ...] active for this call.

        ``fn(activation, hook)`` returns None to only look, or an array of the same shape to replace
        the activation from there on. ``reset_hooks_end=False`` leaves them on the model.
        Only these hooks are removed at the end: hooks added with ``add_hook`` (before, or by a hook
        during the call) stay (TransformerLens 4's rule). ``clear_contexts=True`` empties every
        hook point's ``ctx`` after the call.

        With ``bwd_hooks`` (or a ``metric``) the call also runs the backward pass of a scalar:
        ``metric(logits)`` (see ``npgpt2.metrics``), or the loss with ``return_type="loss"``; it
        returns that scalar, and each ``fn(gradient, hook)`` sees d scalar / d activation.
        """
        pairs, bwd_pairs = self._expand(fwd_hooks), self._expand(bwd_hooks)
        if not reset_hooks_end:
            for n, fn in pairs:
                self.add_hook(n, fn)
            for n, fn in bwd_pairs:
                self.add_hook(n, fn, dir="bwd")
            pairs, bwd_pairs = [], []
        try:
            if bwd_pairs or metric is not None:
                run = self._new_run(pairs, bwd_extra=bwd_pairs, save=self._saved_for_backward)
                value, _ = self._backward_run(run, input, metric, return_type, "run_with_hooks", **kwargs)
                return value
            return self._forward(self._new_run(pairs), input, return_type=return_type, **kwargs)
        finally:
            if clear_contexts:
                self.clear_contexts()

    def run_with_cache(self, input, names_filter=None, return_type="logits", incl_bwd: bool = False,
                       metric=None, remove_batch_dim: bool = False, **kwargs):
        """``forward``, keeping activations: returns (output, ActivationCache).

        names_filter: None (every hook point but ``attn.hook_result``, which comes too when
        ``cfg.use_attn_result`` is set), a name, a list of names, or a predicate on names. Only the requested activations are kept. ``attn.hook_result``
        ([batch, pos, head, d_model] per layer, the largest) is computed only when it is requested.
        incl_bwd: also keep the gradient at each of those names, as ``"{name}_grad"`` (same shape).
            It needs a scalar: ``return_type="loss"`` or ``metric`` (``npgpt2.metrics``); the output
            is then that scalar.
        remove_batch_dim: for a batch of one, drop the batch axis of every cached activation
            (``ActivationCache.remove_batch_dim``); the output keeps its batch axis, as in
            TransformerLens.
        """
        keep = frozenset(self.resolve_hook_names(names_filter))
        if names_filter is None:  # "everything the forward pass computes anyway"
            keep = self._computed_anyway
            if self.cfg.use_attn_result:  # TransformerLens's switch: each head's output too
                keep = keep | {n for n in self._hook_names if n.endswith("attn.hook_result")}
        if incl_bwd or metric is not None:
            run = self._new_run(keep=keep, keep_grad=keep if incl_bwd else frozenset(),
                                save=self._saved_for_backward)
            out, _ = self._backward_run(run, input, metric, return_type, "run_with_cache(incl_bwd=True)",
                                        **kwargs)
        else:
            run = self._new_run(keep=keep)
            out = self._forward(run, input, return_type=return_type, **kwargs)
        cache = ActivationCache(run.cache, self)
        return out, (cache.remove_batch_dim() if remove_batch_dim else cache)


def _merged(base: dict[str, list[HookFn]], *more: Iterable[tuple[str, HookFn]]) -> dict[str, list[HookFn]]:
    """``base`` plus the (name, fn) pairs of ``more``, as a new dict (``base`` is left alone)."""
    pairs = [pair for group in more for pair in group]
    if not pairs:
        return base
    merged = {n: list(fns) for n, fns in base.items()}
    for n, fn in pairs:
        merged.setdefault(n, []).append(fn)
    return merged
