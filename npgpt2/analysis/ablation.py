"""Ablation: remove a component's contribution (zero it, replace it by its mean, or by its value on
another prompt) and measure what changes."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..model import InputError

_COMPONENT = re.compile(r"L(\d+)H(\d+)|L(\d+)N(\d+)|(\d+)_(attn_out|mlp_out)|(?:mlp|attn)(\d+)")


def parse_component(model, name: str) -> tuple[str, tuple]:
    """A component name -> (hook point, index into the activation after [batch, pos]).

    ``L3H5`` head 5 of layer 3 (its z), ``L2N100`` neuron 100 of layer 2's MLP (its post-GELU
    activation), ``4_mlp_out`` / ``mlp4`` a whole MLP layer, ``4_attn_out`` / ``attn4`` a whole
    attention layer.
    """
    m = _COMPONENT.fullmatch(str(name))
    if not m:
        raise InputError(f"unknown component {name!r}: expected L<layer>H<head>, L<layer>N<neuron>, "
                         "<layer>_attn_out, <layer>_mlp_out, attn<layer> or mlp<layer>")
    n_layer, n_head, d_mlp = model.cfg.n_layer, model.cfg.n_head, model.cfg.d_mlp

    def check(layer, what=None, index=None, size=None):
        if not 0 <= layer < n_layer:
            raise InputError(f"component {name!r}: layer {layer} is out of range 0..{n_layer - 1}")
        if what and not 0 <= index < size:
            raise InputError(f"component {name!r}: {what} {index} is out of range 0..{size - 1}")

    if m.group(1) is not None:
        layer, head = int(m.group(1)), int(m.group(2))
        check(layer, "head", head, n_head)
        return f"blocks.{layer}.attn.hook_z", (head,)
    if m.group(3) is not None:
        layer, neuron = int(m.group(3)), int(m.group(4))
        check(layer, "neuron", neuron, d_mlp)
        return f"blocks.{layer}.mlp.hook_post", (neuron,)
    if m.group(5) is not None:
        layer, kind = int(m.group(5)), m.group(6)
    else:
        layer, kind = int(m.group(7)), "mlp_out" if name.startswith("mlp") else "attn_out"
    check(layer)
    return f"blocks.{layer}.hook_{kind}", ()


def ablation_hook(model, component: str, method: str = "zero", positions=None, reference=None,
                  seed: int = 0):
    """(hook point, hook function) that ablates ``component`` at ``positions`` (default: all).

    method: "zero"; "mean" (its mean over the reference prompts, per position when they have as
    many positions as the run, else over all positions too); "resample" (its value on a randomly
    chosen reference prompt, a different one for each prompt of the run).
    reference: token ids [batch, pos] of the reference prompts (for "mean"/"resample"); by default
    the run's own prompts.
    """
    hook_name, index = parse_component(model, component)
    if method not in ("zero", "mean", "resample"):
        raise ValueError(f"method={method!r}: expected 'zero', 'mean' or 'resample'")
    ref_act = None
    if method != "zero" and reference is not None:
        _, ref_cache = model.run_with_cache(reference, names_filter=hook_name)
        ref_act = ref_cache[hook_name][(slice(None), slice(None)) + index]  # [ref_batch, ref_pos, ...]
    rng = np.random.default_rng(seed)
    pos_index = slice(None) if positions is None else np.atleast_1d(positions)

    select = (slice(None), slice(None)) + index  # [batch, pos, <the component>]

    def hook(act, point):
        target = act[select]
        if method == "zero":
            replacement = np.zeros_like(target)
        elif method == "mean":
            source = ref_act if ref_act is not None else target
            axes = 0 if source.shape[1] == target.shape[1] else (0, 1)  # per position if possible
            replacement = np.broadcast_to(source.mean(axis=axes, keepdims=True), target.shape)
        else:  # resample: each prompt gets the component's value on another prompt
            n = target.shape[0]
            if ref_act is not None:
                source, rows = ref_act, rng.integers(0, ref_act.shape[0], n)
            elif n > 1:
                source, rows = target, (np.arange(n) + rng.integers(1, n, n)) % n  # never itself
            else:
                raise InputError("resample ablation of a single prompt needs reference prompts")
            if source.shape[1] != target.shape[1]:
                raise InputError(f"resample ablation needs reference prompts with {target.shape[1]} "
                                 f"positions; they have {source.shape[1]}")
            replacement = source[rows]
        act = act.copy()
        act[(slice(None), pos_index) + index] = replacement[:, pos_index]
        return act

    return hook_name, hook


def ablate(model, tokens, components, method: str = "zero", positions=None, reference=None,
           metric=None, seed: int = 0) -> pd.DataFrame:
    """Ablate each component in turn; one row per component with the loss and the metric before
    and after, and their changes.

    tokens: [batch, pos]; components: names (see ``parse_component``), or one name; metric:
    ``fn(logits) -> float`` (optional). Other arguments as in ``ablation_hook``.
    """
    tokens = model.validate_tokens(tokens)
    components = [components] if isinstance(components, str) else list(components)
    logits = model(tokens)
    base_loss = model._loss_from_logits(logits, tokens, None, per_token=False)
    base_metric = metric(logits) if metric else None
    rows = []
    for name in components:
        hook_name, fn = ablation_hook(model, name, method, positions, reference, seed)
        ablated = model.run_with_hooks(tokens, fwd_hooks=[(hook_name, fn)])
        row = {"component": name, "method": method, "loss": base_loss,
               "ablated_loss": model._loss_from_logits(ablated, tokens, None, per_token=False)}
        row["loss_change"] = row["ablated_loss"] - base_loss
        if metric:
            row.update(metric=base_metric, ablated_metric=metric(ablated))
            row["metric_change"] = row["ablated_metric"] - base_metric
        rows.append(row)
    return pd.DataFrame(rows)
