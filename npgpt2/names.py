"""The hook points' names: ``HOOK_POINTS``, the one list of them (the model, the cache's short
names, patching and the docs' table are all made from it), and TransformerLens's short forms
(``get_act_name``). Names only: no model, no run state (that is hooks.py, which reads this)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HookSpec:
    """One kind of hook point: ``name`` (with ``{l}`` for the block), TransformerLens's short name,
    the shape of the array, what it is, and whether it is computed only when asked for."""

    name: str
    short: str
    shape: str
    doc: str
    on_request: bool = False


HOOK_POINTS = (
    HookSpec("hook_embed", "embed", "[batch, pos, d_model]", "token embeddings, W_E[tokens]"),
    HookSpec("hook_pos_embed", "pos_embed", "[batch, pos, d_model]", "position embeddings, W_pos[pos]"),
    HookSpec("blocks.{l}.hook_resid_pre", "resid_pre", "[batch, pos, d_model]",
             "the residual stream entering the block"),
    HookSpec("blocks.{l}.ln1.hook_scale", "scale", "[batch, pos, 1]",
             "the layer norm's divisor, sqrt(var + eps)"),
    HookSpec("blocks.{l}.ln1.hook_normalized", "normalized", "[batch, pos, d_model]",
             "centred and divided by the scale, *before* the gain and bias"),
    HookSpec("blocks.{l}.attn.hook_q", "q", "[batch, pos, head, d_head]", "queries"),
    HookSpec("blocks.{l}.attn.hook_k", "k", "[batch, pos, head, d_head]", "keys"),
    HookSpec("blocks.{l}.attn.hook_v", "v", "[batch, pos, head, d_head]", "values"),
    HookSpec("blocks.{l}.attn.hook_attn_scores", "attn_scores", "[batch, head, query_pos, key_pos]",
             "q.k / sqrt(d_head); a key in the query's future is -inf"),
    HookSpec("blocks.{l}.attn.hook_pattern", "pattern", "[batch, head, query_pos, key_pos]",
             "softmax of the scores over key_pos"),
    HookSpec("blocks.{l}.attn.hook_z", "z", "[batch, pos, head, d_head]", "the pattern-weighted values"),
    HookSpec("blocks.{l}.attn.hook_result", "result", "[batch, pos, head, d_model]",
             "each head's output z[h] @ W_O[h], no b_O; computed only when asked for", on_request=True),
    HookSpec("blocks.{l}.hook_attn_out", "attn_out", "[batch, pos, d_model]", "the attention layer's output"),
    HookSpec("blocks.{l}.hook_resid_mid", "resid_mid", "[batch, pos, d_model]",
             "resid_pre + attn_out, entering the MLP"),
    HookSpec("blocks.{l}.ln2.hook_scale", "scale", "[batch, pos, 1]", "as ln1"),
    HookSpec("blocks.{l}.ln2.hook_normalized", "normalized", "[batch, pos, d_model]", "as ln1"),
    HookSpec("blocks.{l}.mlp.hook_pre", "pre", "[batch, pos, d_mlp]", "the MLP's input to the GELU"),
    HookSpec("blocks.{l}.mlp.hook_post", "post", "[batch, pos, d_mlp]", "the GELU's output (the neurons)"),
    HookSpec("blocks.{l}.hook_mlp_out", "mlp_out", "[batch, pos, d_model]", "the MLP layer's output"),
    HookSpec("blocks.{l}.hook_resid_post", "resid_post", "[batch, pos, d_model]",
             "resid_mid + mlp_out, leaving the block"),
    HookSpec("ln_final.hook_scale", "scale", "[batch, pos, 1]", "as ln1, before the unembedding"),
    HookSpec("ln_final.hook_normalized", "normalized", "[batch, pos, d_model]", "as ln1"),
)

# TransformerLens's other spellings of a short name
SHORT_ALIASES = {"scores": "attn_scores", "attn": "pattern"}


def hook_names(n_layer: int) -> tuple[str, ...]:
    """Every hook point of an ``n_layer`` model, in the order the forward pass reaches them."""
    before = [s.name for s in HOOK_POINTS if s.name.startswith("hook_")]
    block = [s.name for s in HOOK_POINTS if s.name.startswith("blocks.")]
    after = [s.name for s in HOOK_POINTS if s.name.startswith("ln_final.")]
    return tuple(before + [n.format(l=l) for l in range(n_layer) for n in block] + after)


def block_hook(short: str) -> str:
    """A short name -> the hook's name inside a block: 'pattern' -> 'attn.hook_pattern'
    ('scale' and 'normalized' give ln1's)."""
    short = SHORT_ALIASES.get(short, short)
    for spec in HOOK_POINTS:
        if spec.short == short and spec.name.startswith("blocks."):
            return spec.name[len("blocks.{l}."):]
    raise KeyError(f"no hook point inside a block has the short name {short!r}")


# TransformerLens's other spellings (utils.get_act_name's aliases)
_NAME_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "scores": "attn_scores", "key": "k",
                 "query": "q", "value": "v", "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_LAYER_TYPE_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}
_ATTN_NAMES = ("k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores")
_MLP_NAMES = ("pre", "post", "mid", "pre_linear")
_NOT_IN_GPT2 = {"mid": "it belongs to solu MLPs", "pre_linear": "it belongs to gated MLPs",
                "rot_k": "GPT-2 has no rotary embeddings", "rot_q": "GPT-2 has no rotary embeddings"}


def _tl_act_name(name: str, layer, layer_type):
    """TransformerLens's ``utils.get_act_name`` string rules (its short forms, aliases and layer
    types) -> (short name, layer, layer type); short names with underscores take a layer too
    ('resid_pre5'), where TransformerLens's pattern stops at the underscore."""
    m = re.fullmatch(r"([a-z_]*[a-z])(\d+)([a-z]?.*)", name)
    if m is not None:
        if layer is not None or layer_type is not None:
            raise KeyError(f"{name!r} already gives a layer; pass either {name!r} alone or "
                           f"({m.group(1)!r}, {m.group(2)}{', ' + repr(m.group(3)) if m.group(3) else ''})")
        name, layer, layer_type = m.group(1), int(m.group(2)), m.group(3) or None
    name = _NAME_ALIASES.get(name, name)
    if name in _ATTN_NAMES:
        layer_type = "attn"
    elif name in _MLP_NAMES:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    return name, layer, layer_type


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """A TransformerLens short form -> the hook point's full name (``utils.get_act_name``).

    ('pattern', 3), 'pattern3' -> 'blocks.3.attn.hook_pattern'; 'k6' -> 'blocks.6.attn.hook_k';
    ('normalized', 2, 'ln2'), 'scale4ln1' -> 'blocks.4.ln1.hook_scale'; 'mlp_post', 'mlp_pre',
    'attn', 'attn_logits', 'key', 'query', 'value' are TransformerLens's aliases; 'scale' with no
    layer is 'ln_final.hook_scale'; full names pass through; a layer may be an int or digits.

    Extensions: 'scores' means 'attn_scores'; 'resid_pre5'-style names work (TransformerLens reads
    only letters before the layer and makes 'hook_resid_pre5'); ('scale', None, 'ln_final') is
    'ln_final.hook_scale' (TransformerLens doubles the prefix). Otherwise, where TransformerLens's
    string would name no GPT-2 hook point, this raises a ``KeyError`` that says what to write
    instead: ('scale', 3) without 'ln1'/'ln2' (TransformerLens makes 'blocks.3.hook_scale'), a
    block activation without a layer, 'mid'/'rot_q'/... (other architectures). Negative layers
    need the model: ``cache["resid_post", -1]`` resolves them.
    """
    if not isinstance(name, str):
        raise KeyError(f"activation name must be a str; got {type(name).__name__} {name!r}")
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name  # a full name
    if "." in name:
        raise KeyError(f"{name!r} is a full hook name; it takes no layer or layer_type")
    if isinstance(layer, str) and layer.isdigit():
        layer = int(layer)
    if layer is not None and (not isinstance(layer, (int, np.integer)) or isinstance(layer, bool) or layer < 0):
        raise KeyError(f"layer={layer!r}: expected a layer index >= 0 (negative layers are resolved by "
                       "the cache, which knows the number of layers: cache[name, -1])")
    short, layer, layer_type = _tl_act_name(name, layer, layer_type)
    layer_type = layer_type or None  # TransformerLens's "b"/"block" mean "on the block itself"
    if short in _NOT_IN_GPT2:
        raise KeyError(f"GPT-2 has no {short!r} activation ({_NOT_IN_GPT2[short]})")
    if short not in short_names():
        raise KeyError(f"unknown activation name {name!r}; expected a full hook name or one of "
                       f"{', '.join(short_names())} (optionally with a layer: 'k6', 'resid_pre5')")
    if short in ("embed", "pos_embed"):
        if layer is not None or layer_type is not None:
            raise KeyError(f"{short!r} is not inside a block: it takes no layer or layer_type (it is 'hook_{short}')")
        return "hook_" + short
    if short in ("scale", "normalized"):
        if layer is None:
            if layer_type not in (None, "ln_final"):
                raise KeyError(f"({short!r}, None, {layer_type!r}): {layer_type} is inside a block; give a layer")
            return f"ln_final.hook_{short}"
        if layer_type not in ("ln1", "ln2"):
            raise KeyError(f"({short!r}, {layer}) is ambiguous: each block has two layer norms; say which, "
                           f"e.g. ({short!r}, {layer}, 'ln1') or '{short}{layer}ln2'")
        return f"blocks.{layer}.{layer_type}.hook_{short}"
    if layer is None:
        raise KeyError(f"activation {short!r} is in every block: give a layer, e.g. ({short!r}, 0) or '{short}0'")
    full = f"blocks.{layer}.{block_hook(short)}"
    expected_type = full.split(".")[2] if full.count(".") == 3 else ""
    if (layer_type or "") != expected_type:
        raise KeyError(f"({short!r}, {layer}, {layer_type!r}): {short!r} is "
                       f"{'in ' + expected_type if expected_type else 'on the block itself'} ({full!r})")
    return full


def short_names() -> list[str]:
    """Every short name TransformerLens uses (``cache["pattern", 3]``)."""
    return sorted({s.short for s in HOOK_POINTS} | set(SHORT_ALIASES))


def markdown_table() -> str:
    """The README's table of hook points, made from ``HOOK_POINTS``."""
    rows = ["| name | short | shape | what it is |", "| --- | --- | --- | --- |"]
    for s in HOOK_POINTS:
        rows.append(f"| `{s.name}` | `{s.short}` | {s.shape} | {s.doc} |")
    return "\n".join(rows)
