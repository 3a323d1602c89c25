"""Plausible bugs, each applied to a copy of the code it breaks, to prove the parity judge catches them.

A mutant is one or more edits of source text: the function named by ``Edit.function`` is read
(``inspect.getsource``), the text ``old`` replaced by ``new``, and the edited copy compiled in the
function's own module namespace and put in the original's place for the length of one test
(pytest's ``monkeypatch``), in the module that defines it and in every npgpt2 module that
imported it by name. The code on disk is never changed. An edit whose ``old`` text is no longer
found (the code was rewritten) raises, so a mutant cannot silently become the unchanged code.

Forward mutants break what ``npgpt2 parity`` compares; gradient mutants (``grad=True``) break
only the backward pass and must be caught by ``npgpt2 parity --grad``.
"""

from __future__ import annotations

import __future__
import importlib
import inspect
import sys
import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Edit:
    function: str  # "module.function" or "module.Class.method", e.g. "npgpt2.ops.gelu_new"
    old: str
    new: str
    count: int = 1  # how many times ``old`` occurs in the function (all are replaced)


@dataclass(frozen=True)
class Mutant:
    name: str
    edits: tuple[Edit, ...]
    grad: bool = False  # a bug of the backward pass only


MUTANTS = [
    Mutant("GELU constant 0.044715 -> 0.0447", (
        Edit("npgpt2.ops._exp_minus_2u", "np.multiply(x_squared, 0.044715, out=out)",
             "np.multiply(x_squared, 0.0447, out=out)"),)),
    Mutant("layer-norm epsilon 1e-5 -> 1e-6", (
        Edit("npgpt2.ops.ln_scale", "keepdims=True) + eps)", "keepdims=True) + eps / 10)"),)),
    Mutant("softmax without its max shift", (
        Edit("npgpt2.ops.softmax", "out = np.subtract(x, top, out=out)", "out = np.subtract(x, 0 * top, out=out)"),)),
    Mutant("causal mask off by one (each query sees the next key)", (
        Edit("npgpt2.ops.causal_mask", "k=n_key - n_query + 1)", "k=n_key - n_query + 2)"),)),
    Mutant("attention scaled by sqrt(d_model), not sqrt(d_head)", (
        Edit("npgpt2.model.GPT2._attention", "math.sqrt(self.cfg.d_head)", "math.sqrt(self.cfg.d_model)"),
        Edit("npgpt2.model.GPT2._attention_by_blocks", "math.sqrt(self.cfg.d_head)", "math.sqrt(self.cfg.d_model)"),
        Edit("npgpt2.fast._attention", "math.sqrt(model.cfg.d_head)", "math.sqrt(model.cfg.d_model)"))),
    Mutant("positions off by one under left padding (counted from 1)", (
        Edit("npgpt2.inputs.position_ids", "np.maximum(np.cumsum(keys_mask, axis=1) - 1, 0)",
             "np.cumsum(keys_mask, axis=1)"),)),
    Mutant("loss accumulated in float16 (forward)", (
        Edit("npgpt2.model.GPT2._loss_from_logits", "float(np.nanmean(nll))",
             "float(np.nanmean(nll.astype(np.float16)))"),)),
    # the backward pass
    Mutant("loss accumulated in float16 (value_and_grad)", (
        Edit("npgpt2.metrics.Loss.value_and_grad", "nll.astype(np.float64)", "nll.astype(np.float16)"),), grad=True),
    Mutant("GELU's derivative without the 3 of 3x^2", (
        Edit("npgpt2.ops._gelu_and_slope", "two_du *= 6 * 0.044715 * _GELU_C", "two_du *= 2 * 0.044715 * _GELU_C"),),
           grad=True),
    Mutant("layer norm's backward forgets that the scale depends on x", (
        Edit("npgpt2.backward._layer_norm_backward",
             "d_centred = d_centred + ops.ln_scale_backward(d_scale, normalized)", "d_centred = d_centred"),
        Edit("npgpt2.ops.layer_norm_backward",
             "d_x -= normalized * (d_n * normalized).mean(axis=-1, keepdims=True)", "d_x = d_x")), grad=True),
    Mutant("softmax's backward without the row sum", (
        Edit("npgpt2.ops.softmax_backward", "(d_out - (d_out * out).sum(axis=axis, keepdims=True))", "d_out"),
        Edit("npgpt2.ops.causal_attention_backward", "d_scores -= row_sums", "d_scores -= 0"),
        Edit("npgpt2.fast._attention_backward",
             "d_scores -= (d_z[..., start:stop, :] * z[..., start:stop, :]).sum(axis=-1, keepdims=True)",
             "d_scores -= 0")), grad=True),
    Mutant("tied embedding's gradient without the unembedding's part", (
        Edit("npgpt2.backward.backward", "d_W_E = d_W_U.T if tied else np.zeros_like(w.W_E)",
             "d_W_E = np.zeros_like(w.W_E)"),), grad=True),
    Mutant("keys' gradient not divided by sqrt(d_head)", (
        Edit("npgpt2.backward._attention_backward",
             "d_k_heads = fast.matmul(d_scores.swapaxes(-1, -2), q_heads) / math.sqrt(d_head)",
             "d_k_heads = fast.matmul(d_scores.swapaxes(-1, -2), q_heads)"),
        Edit("npgpt2.ops.causal_attention_backward", "d_k[:, :, :visible] += d_scores.swapaxes(-1, -2) @ q_blk",
             "d_k[:, :, :visible] += d_scores.swapaxes(-1, -2) @ q_blk * math.sqrt(q.shape[-1])"),
        Edit("npgpt2.fast._attention_backward", "d_k[..., :stop, :] += d_scores.swapaxes(-1, -2) @ (q[..., start:stop, :] / root)",
             "d_k[..., :stop, :] += d_scores.swapaxes(-1, -2) @ q[..., start:stop, :]")), grad=True),
]
FORWARD = [m for m in MUTANTS if not m.grad]
GRADIENT = [m for m in MUTANTS if m.grad]


def _owner_and_name(path: str):
    """"npgpt2.model.GPT2._attention" -> (the class GPT2, "_attention"); "npgpt2.ops.gelu_new" ->
    (the module npgpt2.ops, "gelu_new")."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:-1]:
            owner = getattr(owner, attr)
        return owner, parts[-1]
    raise ValueError(f"{path}: no such module")


def mutated(edit_list: list[Edit]):
    """The edited copy of one function (its edits in ``edit_list``, all naming it): the object to
    put in the original's place (a staticmethod stays one)."""
    owner, name = _owner_and_name(edit_list[0].function)
    original = inspect.getattr_static(owner, name)
    function = original.__func__ if isinstance(original, staticmethod) else original
    function = inspect.unwrap(function)  # (functools.lru_cache: its source has the decorator)
    source = textwrap.dedent(inspect.getsource(function))
    for edit in edit_list:
        found = source.count(edit.old)
        if found != edit.count:
            raise AssertionError(f"mutant edit of {edit.function}: {edit.old!r} occurs {found} times; expected "
                                 f"{edit.count} (was the code rewritten? update tests/mutants.py)")
        source = source.replace(edit.old, edit.new)
    namespace: dict = {}
    code = compile(source, f"<mutant of {edit_list[0].function}>", "exec",
                   flags=__future__.annotations.compiler_flag, dont_inherit=True)
    exec(code, function.__globals__, namespace)  # noqa: S102 (the project's own source, edited)
    return owner, name, original, namespace[name]


def apply(mutant: Mutant, monkeypatch) -> None:
    """Put the mutant's edited functions in place of the originals until the test ends."""
    by_function: dict[str, list[Edit]] = {}
    for edit in mutant.edits:
        by_function.setdefault(edit.function, []).append(edit)
    for edits in by_function.values():
        owner, name, original, copy = mutated(edits)
        monkeypatch.setattr(owner, name, copy)
        if inspect.ismodule(owner):  # also where it was imported by name (from .inputs import position_ids)
            for module_name, module in list(sys.modules.items()):
                if module_name.startswith("npgpt2") and getattr(module, name, None) is original:
                    monkeypatch.setattr(module, name, copy)
