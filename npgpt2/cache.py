"""ActivationCache: the activations of one forward pass, by hook name."""

from __future__ import annotations

import difflib

import numpy as np

# TransformerLens's short names: cache["pattern", 3] is cache["blocks.3.attn.hook_pattern"]
_SHORT = {
    "embed": "hook_embed", "pos_embed": "hook_pos_embed",
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "z": "attn.hook_z",
    "attn_scores": "attn.hook_attn_scores", "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern", "attn": "attn.hook_pattern", "result": "attn.hook_result",
    "pre": "mlp.hook_pre", "post": "mlp.hook_post",
    "scale": "hook_scale", "normalized": "hook_normalized",
}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """('pattern', 3) -> 'blocks.3.attn.hook_pattern'; full names pass through (TransformerLens's
    ``utils.get_act_name``). ``layer_type`` picks the layer norm for 'scale'/'normalized':
    'ln1', 'ln2' (with a layer) or 'ln_final'."""
    if "." in name or name.startswith("hook_"):
        return name
    if name not in _SHORT:
        raise KeyError(f"unknown activation name {name!r}; expected a full hook name or one of "
                       f"{', '.join(sorted(_SHORT))}")
    hook = _SHORT[name]
    if name in ("scale", "normalized"):
        if layer is None:
            return f"{layer_type or 'ln_final'}.{hook}"
        return f"blocks.{layer}.{layer_type or 'ln1'}.{hook}"
    if name in ("embed", "pos_embed"):
        return hook
    if layer is None:
        raise KeyError(f"activation {name!r} needs a layer, e.g. ({name!r}, 0)")
    return f"blocks.{layer}.{hook}"


class ActivationCache:
    """A read-mostly mapping {hook name: array} plus the model that produced it.

    Index with the full name (``cache["blocks.0.attn.hook_pattern"]``) or TransformerLens's short
    form (``cache["pattern", 0]``, ``cache["resid_pre", 3]``, ``cache["normalized", 2, "ln2"]``).
    """

    def __init__(self, cache_dict: dict[str, np.ndarray], model):
        self.cache_dict = cache_dict
        self.model = model

    def _key(self, key) -> str:
        if isinstance(key, tuple):
            key = get_act_name(*key)
        if key not in self.cache_dict:
            close = difflib.get_close_matches(str(key), list(self.cache_dict), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(f"{key!r} is not in this cache ({len(self.cache_dict)} activations; "
                           f"was it in names_filter?){hint}")
        return key

    def __getitem__(self, key) -> np.ndarray:
        return self.cache_dict[self._key(key)]

    def __contains__(self, key) -> bool:
        if isinstance(key, tuple):
            key = get_act_name(*key)
        return key in self.cache_dict

    def __iter__(self):
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def __repr__(self):
        return f"ActivationCache({len(self)} activations: {', '.join(list(self)[:4])}{', ...' if len(self) > 4 else ''})"
