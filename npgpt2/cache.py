"""ActivationCache: the activations of one forward pass, by hook name."""

from __future__ import annotations

import difflib
import re

import numpy as np

from . import ops
from .names import get_act_name  # noqa: F401  (TransformerLens users import it from here too)


class ActivationCache:
    """A read-mostly mapping {hook name: array} plus the model that produced it.

    Index with the full name (``cache["blocks.0.attn.hook_pattern"]``) or TransformerLens's short
    form (``cache["pattern", 0]``, ``cache["resid_pre", 3]``, ``cache["normalized", 2, "ln2"]``).
    """

    def __init__(self, cache_dict: dict[str, np.ndarray], model, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    def _key(self, key) -> str:
        if isinstance(key, tuple):
            key = self._tuple_name(key)
        elif isinstance(key, str) and key not in self.cache_dict:
            key = get_act_name(key)  # a short form such as 'resid_pre5' or 'scale'
        if key not in self.cache_dict:
            raise KeyError(self._missing(key))
        return key

    def _tuple_name(self, key: tuple) -> str:
        """(name, layer[, layer_type]) -> the full name; a negative layer counts from the end
        (TransformerLens's rule), and a layer outside the model says so."""
        if len(key) > 1 and key[1] is not None and isinstance(key[1], (int, np.integer)):
            n = self.model.cfg.n_layer
            if not -n <= key[1] < n:
                raise KeyError(f"layer {key[1]} is out of range for a model of {n} layers "
                               f"(expected 0..{n - 1}, or -{n}..-1 from the end): {key!r}")
            if key[1] < 0:
                key = (key[0], n + int(key[1]), *key[2:])
        return get_act_name(*key)

    def _missing(self, key: str) -> str:
        """Why ``key`` is not here, as specifically as can be said."""
        match = re.match(r"blocks\.(\d+)\.", key)
        n = self.model.cfg.n_layer
        if match and int(match.group(1)) >= n:
            return f"{key!r}: layer {match.group(1)} is out of range for a model of {n} layers (0..{n - 1})"
        if key.endswith("attn.hook_result"):
            return (f"{key!r} is not in this cache: each head's result is computed only on request; call "
                    "cache.compute_head_results() (or put it in names_filter)")
        if key.endswith("_grad"):
            return (f"{key!r} is not in this cache: gradients are kept by "
                    "run_with_cache(..., incl_bwd=True, metric=...)")
        known = getattr(self.model, "_points", None)
        if known is not None and key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else "; see model.hook_names()"
            return f"{key!r} is not a hook point of this model{hint}"
        close = difflib.get_close_matches(str(key), list(self.cache_dict), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        return (f"{key!r} is not in this cache ({len(self.cache_dict)} activations; "
                f"was it in names_filter?){hint}")

    def __getitem__(self, key) -> np.ndarray:
        return self.cache_dict[self._key(key)]

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except KeyError:
            return False

    def remove_batch_dim(self) -> "ActivationCache":
        """Drop the batch axis of a batch-of-1 cache, in place (TransformerLens's method): every
        activation [1, ...] becomes [...]. Returns the cache."""
        if not self.has_batch_dim:
            raise ValueError("the batch dimension has already been removed from this cache")
        sizes = {v.shape[0] for v in self.cache_dict.values() if np.ndim(v)}
        if sizes - {1}:
            raise ValueError(f"cannot remove the batch dimension of a batch of {max(sizes)}: it is only "
                             "removed when the batch has one item (index the arrays instead, e.g. cache[name][0])")
        self.cache_dict = {k: v[0] for k, v in self.cache_dict.items()}
        self.has_batch_dim = False
        return self

    def to(self, device) -> "ActivationCache":
        """TransformerLens moves the cache between devices; npgpt2's arrays are NumPy arrays in host
        memory, so "cpu" (or a torch.device("cpu")) is a no-op returning the cache; any other device
        is an error."""
        name = str(device)
        if name.split(":")[0] != "cpu":
            raise ValueError(f"device {name!r}: npgpt2 runs on the CPU with NumPy; the only device is 'cpu'")
        return self

    def __iter__(self):
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        """The hook names held, in the order the forward pass reached them."""
        return self.cache_dict.keys()

    def values(self):
        """The arrays held."""
        return self.cache_dict.values()

    def items(self):
        """(hook name, array) pairs."""
        return self.cache_dict.items()

    def __repr__(self):
        return f"ActivationCache({len(self)} activations: {', '.join(list(self)[:4])}{', ...' if len(self) > 4 else ''})"

    def _repr_html_(self) -> str:
        """Jupyter's view: the hook points grouped by layer, with shapes and sizes (see display.py)."""
        from .display import cache_html

        return cache_html(self)

    # ------------------------------------------------------------------------------------------
    # The residual stream taken apart (TransformerLens's methods, names, labels and shapes).
    # Stacks have the component first: [component, batch, pos, d_model].
    # ------------------------------------------------------------------------------------------
    def _layer(self, layer) -> int:
        n = self.model.cfg.n_layer
        if layer is None or layer == -1:
            return n
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer <= n:
            raise ValueError(f"layer={layer!r} is out of range: expected 0..{n} (or None/-1 for all)")
        return int(layer)

    def accumulated_resid(self, layer=None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream as it stands before each layer: [component, batch, pos, d_model].

        Labels ``{l}_pre`` (and ``{l}_mid`` with ``incl_mid``), then ``final_post`` when ``layer`` is
        None/-1/n_layer. With ``apply_ln`` each is put through the layer norm that reads it there;
        for the final stream that is the whole final layer norm recomputed on each component
        (TransformerLens 4's logit-lens convention), so ``stack @ W_U + b_U`` are logit-lens logits.
        """
        layer = self._layer(layer)
        n = self.model.cfg.n_layer
        parts, labels = [], []
        for l in range(layer + 1):
            if l == n:
                parts.append(self["resid_post", n - 1])
                labels.append("final_post")
                continue
            parts.append(self["resid_pre", l])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                parts.append(self["resid_mid", l])
                labels.append(f"{l}_mid")
        stack = np.stack([_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer=None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream before ``layer`` as the sum of what wrote to it:
        ``embed``, ``pos_embed``, ``{l}_attn_out``, ``{l}_mlp_out``. [component, batch, pos, d_model]

        mode: "all", "attn" or "mlp" (which layer outputs to include).
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode={mode!r}: expected 'all', 'attn' or 'mlp'")
        layer = self._layer(layer)
        parts, labels = [], []
        if incl_embeds:
            parts += [self["hook_embed"], self["hook_pos_embed"]]
            labels += ["embed", "pos_embed"]
        for l in range(layer):
            if mode != "mlp":
                parts.append(self["attn_out", l])
                labels.append(f"{l}_attn_out")
            if mode != "attn":
                parts.append(self["mlp_out", l])
                labels.append(f"{l}_mlp_out")
        if mlp_input and mode != "mlp":
            parts.append(self["attn_out", layer])
            labels.append(f"{layer}_attn_out")
        stack = np.stack([_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def compute_head_results(self) -> None:
        """Add ``blocks.{l}.attn.hook_result`` (each head's output, z[h] @ W_O[h], no b_O) for every
        layer whose result is not cached yet, computed from the cached ``hook_z``."""
        W_O = self.model.W_O  # [layer, head, d_head, d_model]
        for l in range(self.model.cfg.n_layer):
            name = f"blocks.{l}.attn.hook_result"
            if name not in self.cache_dict:
                z = self["z", l]  # [batch, pos, head, d_head]
                self.cache_dict[name] = (z.swapaxes(-2, -3) @ W_O[l]).swapaxes(-2, -3)

    def stack_head_results(self, layer: int = -1, return_labels: bool = False,
                           incl_remainder: bool = False, pos_slice=None, apply_ln: bool = False):
        """Every head's output before ``layer``, labelled ``L{l}H{h}``: [head, batch, pos, d_model].

        ``incl_remainder`` adds ``remainder``: the rest of the residual stream (embeddings, MLPs,
        biases), so the stack sums to ``resid_post`` of layer - 1.
        """
        layer = self._layer(layer)
        self.compute_head_results()
        n_head = self.model.cfg.n_head
        parts, labels = [], []
        for l in range(layer):
            result = _slice(self["result", l], pos_slice, -3)  # [batch, pos, head, d_model]
            parts.append(np.moveaxis(result, -2, 0))
            labels += [f"L{l}H{h}" for h in range(n_head)]
        return self._finish_stack(parts, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels)

    def _finish_stack(self, parts, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels):
        """Concatenate per-layer component stacks [n, batch, pos, d_model]; optionally add the
        ``remainder`` (so the stack sums to ``resid_post`` of layer - 1) and apply the layer norm."""
        template = _slice(self["hook_embed"], pos_slice, -2)
        stack = np.concatenate(parts) if parts else np.zeros((0, *template.shape), template.dtype)
        if incl_remainder:
            total = _slice(self["resid_post", layer - 1], pos_slice, -2) if layer else template * 0
            stack = np.concatenate([stack, (total - stack.sum(0))[None]])
            labels = labels + ["remainder"]
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type=None) -> np.ndarray:
        """``cache[activation_name, l]`` for every l before ``layer``, stacked: [layer, ...]."""
        layer = self._layer(layer)
        return np.stack([self[(activation_name, l, sublayer_type) if sublayer_type else (activation_name, l)]
                         for l in range(layer)])

    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None) -> np.ndarray:
        """Each neuron's write into the residual stream, post[n] * W_out[n]:
        [batch, pos, neuron, d_model] (neurons as picked by ``neuron_slice``)."""
        post = _slice(self["post", layer], pos_slice, -2)
        W_out = self.model.weights.blocks[layer].W_out
        neurons = np.arange(self.model.cfg.d_mlp) if neuron_slice is None else np.atleast_1d(
            np.arange(self.model.cfg.d_mlp)[_as_index(neuron_slice)])
        return post[..., neurons, None] * W_out[neurons]

    def stack_neuron_results(self, layer=None, pos_slice=None, neuron_slice=None,
                             return_labels: bool = False, incl_remainder: bool = False,
                             apply_ln: bool = False):
        """Every MLP neuron's output before ``layer``, labelled ``L{l}N{n}``:
        [neuron, batch, pos, d_model]. Large: d_mlp * layers components; use ``neuron_slice``.

        ``incl_remainder`` adds ``remainder`` so that the stack sums to ``resid_post`` of layer - 1.
        """
        layer = self._layer(layer)
        parts, labels = [], []
        for l in range(layer):
            results = self.get_neuron_results(l, neuron_slice, pos_slice)  # [b, p, neuron, d_model]
            parts.append(np.moveaxis(results, -2, 0))
            neurons = np.atleast_1d(np.arange(self.model.cfg.d_mlp)[_as_index(neuron_slice)])
            labels += [f"L{l}N{n}" for n in neurons]
        return self._finish_stack(parts, labels, layer, pos_slice, incl_remainder, apply_ln, return_labels)

    def apply_ln_to_stack(self, residual_stack: np.ndarray, layer=None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> np.ndarray:
        """Put each component of a stack through the layer norm that reads the residual stream at
        ``layer`` (ln1; ln2 with ``mlp_input``; the final one for None/-1/n_layer), using that layer
        norm's *cached* scale: centre each component, divide by the scale of the whole stream.

        This is linear in the components, so the normalised components still sum to the normalised
        stream (the point of it). No gain or bias is applied. With ``recompute_ln`` (final layer
        only) each component is instead normalised by its own scale and given the final gain and
        bias: a logit lens. [component, batch, pos, d_model] -> same shape.
        """
        layer = self._layer(layer)
        n = self.model.cfg.n_layer
        if has_batch_dim and batch_slice is not None:
            residual_stack = _slice(residual_stack, batch_slice, 1)
        if recompute_ln and layer == n:
            w = self.model.weights
            return ops.layer_norm(residual_stack, w.ln_final_w, w.ln_final_b, self.model.cfg.eps)
        if layer == n:
            key = "ln_final.hook_scale"
        else:
            key = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        scale = _slice(self[key], pos_slice, -2)
        if has_batch_dim and batch_slice is not None:
            scale = _slice(scale, batch_slice, 0)
        return ops.center(residual_stack) / scale

    def get_full_resid_decomposition(self, layer=None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice=None, return_labels: bool = False):
        """The residual stream before ``layer`` as the sum of every head (``L{l}H{h}``), every
        neuron (``L{l}N{n}``; or each MLP, ``{l}_mlp_out``, with ``expand_neurons=False``),
        ``embed``, ``pos_embed`` and ``bias`` (the b_O's, and the b_out's when neurons are expanded).

        [component, batch, pos, d_model]; the components sum exactly to the stream.
        """
        layer = self._layer(layer)
        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0), pos_slice=pos_slice,
                                                return_labels=True)
        parts = [heads]
        if layer > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(layer, pos_slice=pos_slice,
                                                                   return_labels=True)
            else:
                neurons, neuron_labels = self.decompose_resid(layer, pos_slice=pos_slice, mode="mlp",
                                                              incl_embeds=False, return_labels=True)
            parts.append(neurons)
            labels += neuron_labels
        parts += [_slice(self["hook_embed"], pos_slice, -2)[None], _slice(self["hook_pos_embed"], pos_slice, -2)[None]]
        labels += ["embed", "pos_embed"]
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        parts.append(np.broadcast_to(bias, heads.shape[1:])[None].astype(heads.dtype))
        labels.append("bias")
        stack = np.concatenate(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def logit_attrs(self, residual_stack: np.ndarray, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> np.ndarray:
        """Direct logit attribution of each component of a stack (TransformerLens semantics): the
        stack is put through ``apply_ln_to_stack`` at the final layer (centre, divide by the cached
        final scale) and dotted with ``W_U[:, token]`` (minus ``W_U[:, incorrect]``).

        [component, batch, pos, d_model] -> [component, batch, pos] (or as the stack's slices).
        ``tokens``: an id, a string that is one token, or ids per batch row. As in TransformerLens
        the final layer norm's gain is not applied: with ``fold_ln=True`` it is part of W_U and the
        attributions are exact; see ``npgpt2.analysis.direct_logit_attribution`` for a version that
        is exact with or without folding.
        """
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            wrong = self.model.tokens_to_residual_directions(incorrect_tokens)
            if wrong.shape != directions.shape:
                raise ValueError(f"tokens and incorrect_tokens must have the same shape; got "
                                 f"{directions.shape[:-1]} and {wrong.shape[:-1]}")
            directions = directions - wrong
        scaled = self.apply_ln_to_stack(residual_stack, -1, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        if has_batch_dim and scaled.ndim == 4 and directions.ndim == 2 and directions.shape[0] == scaled.shape[1]:
            directions = directions[:, None, :]  # one direction per batch row, every position
        return (scaled * directions).sum(-1)


def _as_index(s):
    """TransformerLens's slice inputs: None (all), an int, a (start, stop[, step]) tuple, a slice,
    or a list/array of indices."""
    if s is None:
        return slice(None)
    if isinstance(s, tuple):
        return slice(*s)
    if isinstance(s, (list, np.ndarray)):
        return np.asarray(s)
    return s


def _slice(x: np.ndarray, s, dim: int) -> np.ndarray:
    """Apply a TransformerLens-style slice input to one axis (an int removes the axis)."""
    if s is None:
        return x
    index = [slice(None)] * x.ndim
    index[dim] = _as_index(s)
    return x[tuple(index)]
