"""The weights under TransformerLens's names, stacked over layers: ``model.W_Q[l, h]`` is head h of
layer l's query matrix [d_model, d_head].

The forward pass keeps GPT-2's own layout (one ``W_qkv`` per block, see weights.py), which is the
fast one. These views are built from it on first access and kept (read-only: editing ``W_Q`` would
not change the model; edit ``model.weights`` and the views are rebuilt).
"""

from __future__ import annotations

import numpy as np

# name -> (docstring shape, builder(cfg, weights) -> array)
_VIEWS = {
    "W_Q": "[n_layer, n_head, d_model, d_head]", "W_K": "[n_layer, n_head, d_model, d_head]",
    "W_V": "[n_layer, n_head, d_model, d_head]", "b_Q": "[n_layer, n_head, d_head]",
    "b_K": "[n_layer, n_head, d_head]", "b_V": "[n_layer, n_head, d_head]",
    "W_O": "[n_layer, n_head, d_head, d_model]", "b_O": "[n_layer, d_model]",
    "W_in": "[n_layer, d_model, d_mlp]", "b_in": "[n_layer, d_mlp]",
    "W_out": "[n_layer, d_mlp, d_model]", "b_out": "[n_layer, d_model]",
}


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
    if name == "W_O":  # rows of W_attn_out are (head, d_head)
        return np.stack([b.W_attn_out.reshape(H, Dh, D) for b in blocks])
    return np.stack([getattr(b, name) for b in blocks])  # b_O, W_in, b_in, W_out, b_out


def _view(name: str) -> property:
    def get(self) -> np.ndarray:
        owner, views = self.__dict__.get("_views", (None, {}))
        if owner is not self.weights:  # first access, or model.weights was replaced: rebuild
            owner, views = self.weights, {}
            self.__dict__["_views"] = (owner, views)
        if name not in views:
            array = _build(name, self.cfg, owner)
            array.flags.writeable = False
            views[name] = array
        return views[name]

    return property(get, doc=_VIEWS[name])


class WeightViews:
    """TransformerLens's weight names for ``GPT2``. Expects ``self.cfg`` and ``self.weights``."""

    W_Q, W_K, W_V = _view("W_Q"), _view("W_K"), _view("W_V")
    b_Q, b_K, b_V = _view("b_Q"), _view("b_K"), _view("b_V")
    W_O, b_O = _view("W_O"), _view("b_O")
    W_in, b_in, W_out, b_out = _view("W_in"), _view("b_in"), _view("W_out"), _view("b_out")

    @property
    def W_E(self) -> np.ndarray:
        """[d_vocab, d_model]"""
        return self.weights.W_E

    @property
    def W_pos(self) -> np.ndarray:
        """[n_ctx, d_model]"""
        return self.weights.W_pos

    @property
    def W_U(self) -> np.ndarray:
        """[d_model, d_vocab]"""
        return self.weights.W_U

    @property
    def b_U(self) -> np.ndarray:
        """[d_vocab] (zeros for GPT-2, which has no unembedding bias)"""
        if self.weights.b_U is not None:
            return self.weights.b_U
        return np.zeros(self.cfg.d_vocab, self.dtype)
