"""The weights under TransformerLens's names, stacked over layers: ``model.W_Q[l, h]`` is head h of
layer l's query matrix [d_model, d_head].

The forward pass keeps GPT-2's own layout (one ``W_qkv`` per block, see weights.py), which is the
fast one. These views are built from it on first access and kept until the weights change. They are
read-only: a write such as ``model.W_Q[0, 0] = 0`` would not reach the forward pass's layout, so it
fails with a ``WeightEditError`` that says how to edit instead: ``model.set_weight("W_Q", 0, value,
head=0)``, which writes the stored weights (a copy of the block it touches) and rebuilds the views.
"""

from __future__ import annotations

import dataclasses
import difflib

import numpy as np

# name -> docstring shape (per-layer names, stacked over layers)
_VIEWS = {
    "W_Q": "[n_layer, n_head, d_model, d_head]", "W_K": "[n_layer, n_head, d_model, d_head]",
    "W_V": "[n_layer, n_head, d_model, d_head]", "b_Q": "[n_layer, n_head, d_head]",
    "b_K": "[n_layer, n_head, d_head]", "b_V": "[n_layer, n_head, d_head]",
    "W_O": "[n_layer, n_head, d_head, d_model]", "b_O": "[n_layer, d_model]",
    "W_in": "[n_layer, d_model, d_mlp]", "b_in": "[n_layer, d_mlp]",
    "W_out": "[n_layer, d_mlp, d_model]", "b_out": "[n_layer, d_model]",
}
# names of the whole model (no layer)
_GLOBAL = {"W_E": "[d_vocab, d_model]", "W_pos": "[n_ctx, d_model]", "W_U": "[d_model, d_vocab]",
           "b_U": "[d_vocab] (zeros for GPT-2, which has no unembedding bias)"}
_PER_HEAD = ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V", "W_O")


class WeightEditError(ValueError):
    """A write into a read-only weight view, or a ``set_weight`` call that does not fit."""


def _how_to_edit(name: str | None) -> str:
    shown = name or "W_Q"
    return (f"model.{shown} is a read-only view of the weights (writing into it would not change the model); "
            f"edit with model.set_weight({shown!r}, layer, value[, head=h]), e.g. "
            f"model.set_weight({shown!r}, 0, 0.0, head=3)" if shown in _VIEWS else
            f"model.{shown} is a read-only view of the weights; edit with model.set_weight({shown!r}, None, value)")


class WeightView(np.ndarray):
    """A read-only ``np.ndarray`` of weights whose writes fail with a message saying how to edit.
    Everything computed from it (sums, products, copies) is a plain ``np.ndarray``."""

    _weight_name: str | None = None

    def __array_finalize__(self, obj):
        self._weight_name = getattr(obj, "_weight_name", None)

    def __getitem__(self, index):
        out = super().__getitem__(index)
        if isinstance(out, WeightView) and out.flags.writeable:  # a copy (fancy indexing): the caller's own
            return out.view(np.ndarray)
        return out  # a view stays guarded (a scalar is a scalar)

    def copy(self, order="C"):
        return np.array(self, order=order)

    def __setitem__(self, index, value):
        if not self.flags.writeable:
            raise WeightEditError(_how_to_edit(self._weight_name))
        super().__setitem__(index, value)

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        if out is not None:
            for o in out:
                if isinstance(o, WeightView) and not o.flags.writeable:  # model.W_Q[0] *= 0
                    raise WeightEditError(_how_to_edit(o._weight_name))
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, WeightView) else o for o in out)
        inputs = tuple(x.view(np.ndarray) if isinstance(x, WeightView) else x for x in inputs)
        return getattr(ufunc, method)(*inputs, **kwargs)


def _read_only(array: np.ndarray, name: str) -> WeightView:
    view = array.view(WeightView)
    view._weight_name = name
    view.flags.writeable = False
    return view


def _build(name: str, cfg, weights) -> np.ndarray:
    D, H, Dh = cfg.d_model, cfg.n_head, cfg.d_head
    blocks = weights.blocks
    if name in ("W_Q", "W_K", "W_V"):  # columns q | k | v of W_qkv, each [d_model, head, d_head]
        part = "QKV".index(name[-1])
        return np.stack([b.W_qkv[:, part * D:(part + 1) * D].reshape(D, H, Dh).transpose(1, 0, 2)
                         for b in blocks])
    if name in ("b_Q", "b_K", "b_V"):
        part = "QKV".index(name[-1])
        return np.stack([b.b_qkv[part * D:(part + 1) * D].reshape(H, Dh) for b in blocks])
    if name == "W_O":  # rows of W_O are (head, d_head)
        return np.stack([b.W_O.reshape(H, Dh, D) for b in blocks])
    if name == "b_U" and weights.b_U is None:
        return np.zeros(cfg.d_vocab, weights.W_E.dtype)
    if name in _GLOBAL:
        return getattr(weights, name)  # a view, no copy
    return np.stack([getattr(b, name) for b in blocks])  # b_O, W_in, b_in, W_out, b_out


def _store(name: str, layer_value: np.ndarray, block, cfg):
    """One layer's new value of a per-layer name -> the block with it written into GPT-2's layout
    (new arrays for what changes; the rest is shared)."""
    D = cfg.d_model
    if name in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V"):
        part = "QKV".index(name[-1])
        if name.startswith("W"):
            W_qkv = np.array(block.W_qkv)
            W_qkv[:, part * D:(part + 1) * D] = layer_value.transpose(1, 0, 2).reshape(D, D)
            return dataclasses.replace(block, W_qkv=W_qkv)
        b_qkv = np.array(block.b_qkv)
        b_qkv[part * D:(part + 1) * D] = layer_value.reshape(D)
        return dataclasses.replace(block, b_qkv=b_qkv)
    if name == "W_O":
        return dataclasses.replace(block, W_O=layer_value.reshape(D, D).copy())
    return dataclasses.replace(block, **{name: layer_value.copy()})


def _view(name: str) -> property:
    def get(self) -> np.ndarray:
        owner, views = self.__dict__.get("_views", (None, {}))
        if owner is not self.weights:  # first access, or model.weights was replaced: rebuild
            owner, views = self.weights, {}
            self.__dict__["_views"] = (owner, views)
        if name not in views:
            views[name] = _read_only(_build(name, self.cfg, owner), name)
        return views[name]

    def set(self, value) -> None:
        raise WeightEditError(_how_to_edit(name))

    return property(get, set, doc=_VIEWS.get(name) or _GLOBAL[name])


class WeightViews:
    """TransformerLens's weight names for ``GPT2``. Expects ``self.cfg`` and ``self.weights``."""

    W_Q, W_K, W_V = _view("W_Q"), _view("W_K"), _view("W_V")
    b_Q, b_K, b_V = _view("b_Q"), _view("b_K"), _view("b_V")
    W_O, b_O = _view("W_O"), _view("b_O")
    W_in, b_in, W_out, b_out = _view("W_in"), _view("b_in"), _view("W_out"), _view("b_out")
    W_E, W_pos, W_U, b_U = _view("W_E"), _view("W_pos"), _view("W_U"), _view("b_U")

    def set_weight(self, name: str, layer: int | None, value, head: int | None = None) -> None:
        """Write weights under TransformerLens's names; the forward pass uses them from the next call.

        name: W_Q, W_K, W_V, b_Q, b_K, b_V, W_O (per layer and head), b_O, W_in, b_in, W_out,
            b_out (per layer), or W_E, W_pos, W_U, b_U (the whole model: ``layer=None``).
        layer: the layer to write (negative counts from the end), or None for every layer at once
            (``value`` then has the stacked shape of ``model.<name>``).
        head: for the per-head names, one head of that layer (or None: all heads).
        value: an array of exactly the shape of ``model.<name>[layer, head]``, or a number (written
            everywhere there); real and finite; cast to the model's dtype.

        ``model.set_weight("W_O", 0, 0.0, head=3)`` removes head 0.3's output. GPT-2's unembedding is
        its embedding: writing one of W_E / W_U gives the other an array of its own (unchanged), as
        TransformerLens keeps them. The views (``model.W_Q`` ...) are rebuilt.
        """
        if name not in _VIEWS and name not in _GLOBAL:
            names = [*_VIEWS, *_GLOBAL]
            same = [n for n in names if n.lower() == str(name).lower()]  # W_q -> W_Q
            close = same or difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise WeightEditError(f"set_weight: unknown weight {name!r}; expected one of "
                                  f"{', '.join([*_VIEWS, *_GLOBAL])}{hint}")
        index: tuple = ()
        if name in _GLOBAL:
            if layer is not None:
                raise WeightEditError(f"set_weight({name!r}, layer={layer!r}): {name} belongs to no layer; pass None")
        elif layer is not None:
            index = (_check_index(layer, self.cfg.n_layer, "layer", name),)
        if head is not None:
            if name not in _PER_HEAD:
                raise WeightEditError(f"set_weight({name!r}, head={head!r}): {name} has no heads "
                                      f"(heads: {', '.join(_PER_HEAD)})")
            index = (index or (slice(None),)) + (_check_index(head, self.cfg.n_head, "head", name),)
        current = getattr(self, name)
        target_shape = current[index].shape
        value = _checked_value(name, value, target_shape, self.dtype)
        stacked = np.array(current)  # a writable copy of the whole stack; blocks not touched stay shared
        stacked[index] = value
        w = self.weights
        if name in _GLOBAL:
            new = {name: stacked}
            if name in ("W_E", "W_U") and np.shares_memory(w.W_E, w.W_U):  # tied: untie, keeping the other
                other = "W_U" if name == "W_E" else "W_E"
                new[other] = np.array(getattr(w, other))
            self.weights = dataclasses.replace(w, **new)
            return
        layers = range(self.cfg.n_layer) if not index or isinstance(index[0], slice) else [index[0]]
        blocks = list(w.blocks)
        for l in layers:
            blocks[l] = _store(name, stacked[l], blocks[l], self.cfg)
        self.weights = dataclasses.replace(w, blocks=blocks)


    def state_dict(self) -> dict:
        """The parameters under TransformerLens's names (its ``HookedTransformer.state_dict()``,
        TransformerBridge's ``tl_parameters()``), in its order, as plain arrays (copies):
        "embed.W_E" [d_vocab, d_model], "pos_embed.W_pos" [n_ctx, d_model]; per layer l
        "blocks.{l}.attn.W_Q" / W_K / W_V [head, d_model, d_head], "...attn.W_O" [head, d_head, d_model],
        "...attn.b_Q" / b_K / b_V [head, d_head], "...attn.b_O" [d_model], "...mlp.W_in" [d_model, d_mlp],
        "...mlp.W_out" [d_mlp, d_model], "...mlp.b_in" [d_mlp], "...mlp.b_out" [d_model],
        "...ln1.w" / ln1.b / ln2.w / ln2.b [d_model]; "ln_final.w" / "ln_final.b" [d_model];
        "unembed.W_U" [d_model, d_vocab], "unembed.b_U" [d_vocab]. A folded layer norm (fold_ln) shows
        gain 1 and bias 0, as in TransformerLens. ``load_state_dict`` writes them back."""
        return {key: np.array(get()) for key, get, _ in self._parameter_slots()}

    tl_parameters = state_dict

    def load_state_dict(self, state_dict: dict, strict: bool = True) -> None:
        """Write parameters given under ``state_dict``'s TransformerLens names (shapes as there),
        through ``set_weight``'s checks. ``strict``: every parameter of the model must be given."""
        slots = {key: put for key, _, put in self._parameter_slots()}
        unknown = [k for k in state_dict if k not in slots]
        if unknown:
            bridge = [k for k in unknown if k.endswith((".weight", ".bias"))]
            hint = ("; those are TransformerBridge's module names: npgpt2 takes TransformerLens's "
                    "(its tl_parameters(): embed.W_E, blocks.0.attn.W_Q, ...)") if bridge else ""
            raise WeightEditError(f"load_state_dict: {len(unknown)} names this model has no parameter for: "
                                  f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}{hint}")
        missing = [k for k in slots if k not in state_dict]
        if strict and missing:
            raise WeightEditError(f"load_state_dict: {len(missing)} parameters missing: {', '.join(missing[:5])}"
                                  f"{' ...' if len(missing) > 5 else ''} (strict=False loads the others)")
        per_layer: dict[str, dict[int, np.ndarray]] = {}  # one set_weight per name when all layers come
        for key, value in state_dict.items():
            name, layer = slots[key](value)
            if name is not None:
                per_layer.setdefault(name, {})[layer] = value
        for name, layers in per_layer.items():
            if len(layers) == self.cfg.n_layer:
                self.set_weight(name, None, np.stack([np.asarray(layers[l]) for l in range(self.cfg.n_layer)]))
            else:
                for l, value in layers.items():
                    self.set_weight(name, l, value)

    def _parameter_slots(self):
        """(TransformerLens name, read(), write(value)) of every parameter, in TransformerLens's order.
        write returns (name, layer) for a per-layer ``set_weight`` name (stacked by the caller) or
        (None, None) once it has written the value itself."""
        def whole(name):
            return (lambda: getattr(self, name)), (lambda v: (self.set_weight(name, None, v), (None, None))[1])

        def layer(name, l):
            return (lambda: getattr(self, name)[l]), (lambda v: (name, l))

        def norm(field, l=None):
            folded_value = 1.0 if field.endswith("_w") else 0.0  # a folded layer norm: gain 1, bias 0

            def get():
                value = getattr(self.weights if l is None else self.weights.blocks[l], field)
                return np.full(self.cfg.d_model, folded_value, self.dtype) if value is None else value

            def put(value):
                where = f"ln_final.{field[-1]}" if l is None else f"blocks.{l}.{field[:3]}.{field[-1]}"
                value = _checked_value(where, value, get().shape, self.dtype)
                if getattr(self.weights if l is None else self.weights.blocks[l], field) is None:
                    if not (value == folded_value).all():
                        raise WeightEditError(f"load_state_dict: {where} must be {folded_value:g} everywhere: this "
                                              "model's layer norms are folded into the next weights (fold_ln); load "
                                              "into a model loaded without fold_ln")
                    return None, None
                if l is None:
                    self.weights = dataclasses.replace(self.weights, **{field: value})
                else:
                    blocks = list(self.weights.blocks)
                    blocks[l] = dataclasses.replace(blocks[l], **{field: value})
                    self.weights = dataclasses.replace(self.weights, blocks=blocks)
                return None, None
            return get, put

        slots = [("embed.W_E", *whole("W_E")), ("pos_embed.W_pos", *whole("W_pos"))]
        for l in range(self.cfg.n_layer):
            slots += [(f"blocks.{l}.attn.{n}", *layer(n, l)) for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")]
            slots += [(f"blocks.{l}.mlp.{n}", *layer(n, l)) for n in ("W_in", "W_out", "b_in", "b_out")]
            slots += [(f"blocks.{l}.{f[:3]}.{f[-1]}", *norm(f, l)) for f in ("ln1_w", "ln1_b", "ln2_w", "ln2_b")]
        slots += [(f"ln_final.{f[-1]}", *norm(f)) for f in ("ln_final_w", "ln_final_b")]
        return slots + [("unembed.W_U", *whole("W_U")), ("unembed.b_U", *whole("b_U"))]


def _check_index(i, n: int, what: str, name: str) -> int:
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not -n <= i < n:
        raise WeightEditError(f"set_weight({name!r}): {what}={i!r} is out of range for {n} {what}s")
    return int(i) % n


def _checked_value(name: str, value, shape: tuple, dtype) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise WeightEditError(f"set_weight({name!r}): value has dtype {arr.dtype}; expected real numbers")
    if arr.ndim and arr.shape != shape:
        raise WeightEditError(f"set_weight({name!r}): value has shape {arr.shape}; expected {shape} "
                              "(or a single number)")
    if not np.isfinite(arr).all():
        raise WeightEditError(f"set_weight({name!r}): value holds NaN or inf")
    with np.errstate(over="ignore"):
        cast = arr.astype(dtype)
    if not np.isfinite(cast).all():  # finite in float64, too large for a float32 model
        too_big = float(np.abs(arr).max())
        raise WeightEditError(f"set_weight({name!r}): value {too_big:g} overflows the model's {np.dtype(dtype)} "
                              f"(largest finite: {np.finfo(dtype).max:g})")
    return cast
