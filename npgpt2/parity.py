"""The parity judge: npgpt2 against Hugging Face transformers (and torch autograd), float64 the referee.

Comparing npgpt2's float32 output with transformers' float32 output measures two rounding errors
at once. So the reference is transformers in float64, and npgpt2 in float32 is held to the accuracy
transformers itself reaches in float32 *on the same quantity and the same rows* (a row is the last
axis: one position's logits, one residual vector, one query's attention, one row of a weight's
gradient):

* per row r: npgpt2's error ``err_r`` = max |npgpt2 - float64 reference|, transformers' error
  ``hf_r`` = max |transformers float32 - float64 reference|, and the row's ratio
  ``err_r / max(hf_r, floor_r)``, where ``floor_r`` is ``FLOOR_ULPS`` (4) float32 steps at the row's
  scale (its largest |reference value|, or ``unit`` if larger: 1 for activations, a gradient's own
  largest |value| for gradients): an error of a few steps is never held against npgpt2, however
  lucky transformers' rounding was on that row;
* float32 passes when the ratio is at most ``TYPICAL_LIMIT`` (4) at the ``PERCENTILE`` (90th)
  percentile of the rows and at most ``WORST_LIMIT`` (20) at the worst row, and every value is finite;
  a worst row beyond 20 still passes if npgpt2's largest error over scale, on any row, is no larger
  than the float32 reference's largest on the same quantity (npgpt2 is then as accurate as the
  reference where each is least accurate: the reference was lucky on that row, not npgpt2 wrong);
* float64 keeps an absolute bound: every row within ``FLOAT64_ROW_LIMIT`` (1e-9) of its scale.

Why a percentile and a worst row, not the largest error over the whole quantity: the largest
error of a quantity is often that of a few numbers (position 0's residual of norm ~3,000 has its
largest error in a handful of entries near 2,000, a fraction of one float32 step or one and a half
depending on the summation order), so a ratio of maxima fails by luck. Over rows, luck averages
out at the percentile; the worst row still catches an error confined to a few rows. Why 4 and 20, not 1:
numpy's BLAS (OpenBLAS) and torch's (MKL or oneDNN) sum a dot product's terms in different orders,
and OpenBLAS's error on 768-term float32 products was measured at 1.4 to 1.9 times MKL's. On the
unchanged code the largest ratios measured were 3.0 at the percentile (an MLP activation's
gradient at gpt2-medium's width) and 16.7 to 26.7 at a worst row (one entry of a layer norm's gain
gradient, in an outlier dimension whose terms nearly cancel: a gradient's rows are single entries,
and where the reference rounded that entry luckily, any other order of summation is many times
off, yet within the reference's own largest error on the gradient); the mutants of
tests/mutants.py measure 7 to 10^6 (docs/parity.md).

``judge`` returns a ``Verdict`` (errors, ratios, worst row, pass or fail and why; ``as_dict`` for
JSON). ``check(model)`` runs the whole comparison: every quantity of the forward pass, and with
``grad=True`` every parameter gradient of ``value_and_grad`` and every activation gradient of
``run_with_cache(incl_bwd=True)`` against torch autograd (needs the ``reference`` extra).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

FLOOR_ULPS = 4.0
PERCENTILE = 90.0
TYPICAL_LIMIT = 4.0
WORST_LIMIT = 20.0
FLOAT64_ROW_LIMIT = 1e-9
FLOAT32_STEP = float(np.finfo(np.float32).eps)  # 2^-23: one float32 step at a value of 1

DEFAULT_TEXTS = ("Hello, my dog is cute", "I am not sure what you are saying",
                 "Alan Turing theorized that computers would one day become")
REFERENCE_EXTRA = 'pip install "npgpt2[reference]"'


class ReferenceUnavailable(RuntimeError):
    """torch or transformers is not installed: the comparison cannot run."""


@dataclass(frozen=True)
class Verdict:
    """The judge's findings on one quantity."""

    name: str
    dtype: str  # npgpt2's precision: "float32" or "float64"
    error: float  # largest |npgpt2 - float64 reference|
    float32_error: float  # largest |reference library in float32 - float64 reference|
    ratio_typical: float  # the rows' ratio at the PERCENTILE (float32's judgement)
    ratio_worst: float  # the rows' largest ratio (float32's judgement)
    worst_row: int  # the row of the largest ratio (float32) or of the largest error over scale (float64)
    row_error: float  # that row's |npgpt2 - reference| over its scale
    passed: bool
    reason: str  # why it failed ("" when it passed)

    def as_dict(self) -> dict:
        """The findings as a JSON-ready dict (non-finite numbers as strings: JSON has none)."""
        return {k: (v if not isinstance(v, float) or np.isfinite(v) else str(v)) for k, v in asdict(self).items()} | \
            {"verdict": "pass" if self.passed else "fail"}

    def line(self, width: int = 34) -> str:
        """One table row: name, the two errors, the ratios (percentile, worst row), pass or FAIL and why."""
        return (f"{self.name:<{width}} {self.error:>10.3e} {self.float32_error:>10.3e} {self.ratio_typical:>7.2f} "
                f"{self.ratio_worst:>7.2f} {self.worst_row:>6}  {'pass' if self.passed else 'FAIL: ' + self.reason}")

    @staticmethod
    def header(width: int = 34) -> str:
        return (f"{'quantity':<{width}} {'npgpt2 err':>10} {'ref32 err':>10} {'p' + format(PERCENTILE, 'g'):>7} "
                f"{'worst':>7} {'row':>6}  result")

    def __str__(self):
        return (f"{self.name} ({self.dtype}): npgpt2 error {self.error:.3e}, float32 reference error "
                f"{self.float32_error:.3e}, ratio {self.ratio_typical:.2f} at the {PERCENTILE:g}th percentile of rows, "
                f"{self.ratio_worst:.2f} at worst (row {self.worst_row}, off by {self.row_error:.2e} of its scale): "
                + ("pass" if self.passed else "FAIL, " + self.reason))


def _rows(a) -> np.ndarray:
    """Any array -> float64 [rows, last axis]. A last axis of one (a layer norm's scale, [batch,
    pos, 1]) is dropped first, so that a row is never a single number of a larger array; a vector
    (a bias's gradient) is a column, each entry a row, so that its judgement is a statistic over
    many rows too; a scalar is one row."""
    a = np.asarray(a, dtype=np.float64)
    while a.ndim > 2 and a.shape[-1] == 1:
        a = a[..., 0]
    return a.reshape(-1, a.shape[-1]) if a.ndim >= 2 else a.reshape(-1, 1)


def _row_errors(ours, reference, float32, name):
    """Per row: npgpt2's error, the float32 reference's error, the scale.  -> three [rows] arrays"""
    if isinstance(ours, np.ndarray) or not isinstance(ours, Sequence):
        ours, reference, float32 = [ours], [reference], [float32]
    if not len(ours) == len(reference) == len(float32) > 0:
        raise ValueError(f"{name}: {len(ours)} npgpt2 arrays, {len(reference)} references and "
                         f"{len(float32)} float32 arrays; expected the same number, at least one")
    err, ref_err, scale = [], [], []
    for o, r, t in zip(ours, reference, float32):
        o, r, t = np.asarray(o), np.asarray(r), np.asarray(t)
        if not o.shape == r.shape == t.shape:
            raise ValueError(f"{name}: shapes differ: npgpt2 {o.shape}, reference {r.shape}, float32 {t.shape}")
        o, r, t = _rows(o), _rows(r), _rows(t)
        err.append(np.max(np.abs(o - r), axis=-1, initial=0.0))  # NaN stays NaN: it cannot pass
        ref_err.append(np.max(np.abs(t - r), axis=-1, initial=0.0))
        scale.append(np.max(np.abs(r), axis=-1, initial=0.0))
    return np.concatenate(err), np.concatenate(ref_err), np.concatenate(scale)


def row_ratios(err: np.ndarray, ref_err: np.ndarray, scale: np.ndarray, floor_ulps: float = FLOOR_ULPS) -> np.ndarray:
    """Each row's npgpt2 error over the float32 reference's, or over ``floor_ulps`` float32 steps
    at the row's scale if that is larger; 0 for an exact row.  [rows] x 3 -> [rows]"""
    denominator = np.maximum(ref_err, floor_ulps * FLOAT32_STEP * scale)

    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / denominator)
    return np.where(np.isnan(err), np.inf, ratio)


def judge(ours, reference, float32, dtype: str | None = None, name: str = "logits", *, unit: float = 1.0,
          percentile: float = PERCENTILE, typical_limit: float = TYPICAL_LIMIT, worst_limit: float = WORST_LIMIT,
          floor_ulps: float = FLOOR_ULPS, float64_row_limit: float = FLOAT64_ROW_LIMIT) -> Verdict:
    """Judge npgpt2's output ``ours`` against the float64 reference ``reference``.

    ``float32`` is the reference library's float32 output on the same input: its error is the
    yardstick for npgpt2 in float32 (and is reported for float64). Each argument may be one array
    or a sequence of arrays (several prompts of different lengths); rows are the last axis.
    ``dtype``: npgpt2's precision (by default ``ours``'s dtype). ``unit``: the smallest scale a row
    is measured against in float64 (1 for activations; a gradient's own largest |value|, whose
    size says nothing about 1). The rule is in the module's docstring.
    """
    if isinstance(ours, np.ndarray) or not isinstance(ours, Sequence):
        dtype = dtype or str(np.asarray(ours).dtype)
    else:
        dtype = dtype or str(np.asarray(ours[0]).dtype)
    if dtype not in ("float32", "float64"):
        raise ValueError(f"{name}: dtype={dtype!r}: expected 'float32' or 'float64'")
    err, ref_err, scale = _row_errors(ours, reference, float32, name)
    error = float(np.max(err)) if not np.isnan(err).any() else float("nan")
    float32_error = float(np.max(ref_err))
    scale = np.maximum(scale, unit)  # a row's scale: its largest |reference value|, at least ``unit``
    ratio = row_ratios(err, ref_err, scale, floor_ulps)
    typical, worst_ratio = float(np.percentile(ratio, percentile)), float(np.max(ratio))
    relative = np.where(np.isnan(err), np.inf, err / scale)  # float64's measure
    worst = int(np.argmax(ratio if dtype == "float32" else relative))
    reasons = []
    if not np.all(np.isfinite(err)):
        bad = ~np.isfinite(err)
        reasons.append(f"{int(bad.sum())} row(s) not finite, first row {int(np.argmax(bad))}")
    elif dtype == "float32":
        if not typical <= typical_limit:
            reasons.append(f"ratio {typical:.2f} at the {percentile:g}th percentile of rows (limit {typical_limit:g})")
        # a worst row beyond the limit is the reference's luck on that row when npgpt2's largest error
        # over scale is within the reference's own largest
        ours_largest, reference_largest = float(np.max(relative)), float(np.max(ref_err / scale))
        if not worst_ratio <= worst_limit and not ours_largest <= reference_largest:
            reasons.append(f"row {worst} off by {err[worst]:.3e}, {worst_ratio:.2f}x the float32 reference's "
                           f"{ref_err[worst]:.3e} (limit {worst_limit:g}x), and npgpt2's largest error "
                           f"{ours_largest:.2e} of a row's scale against the reference's largest {reference_largest:.2e}")
    elif not relative[worst] <= float64_row_limit:
        reasons.append(f"row {worst} off by {err[worst]:.3e} = {relative[worst]:.2e} of its scale "
                       f"{scale[worst]:.4g} (limit {float64_row_limit:g})")
    return Verdict(name=name, dtype=dtype, error=error, float32_error=float32_error, ratio_typical=typical,
                   ratio_worst=worst_ratio, worst_row=worst, row_error=float(relative[worst]),
                   passed=not reasons, reason="; ".join(reasons))


# ------------------------------------------------------------------------- the comparison
class Comparison:
    """Collects, quantity by quantity, npgpt2's arrays and the reference's in float64 and float32
    (one of each per prompt), then judges them all."""

    def __init__(self):
        self.found: dict[str, tuple[list, list, list, float | None]] = {}

    def add(self, name: str, ours, reference64, reference32, unit: float | None = 1.0) -> None:
        """One prompt's arrays of quantity ``name``. ``unit``: as ``judge``'s; None: the reference's
        own largest |value| over all prompts (for gradients)."""
        lists = self.found.setdefault(name, ([], [], [], unit))
        lists[0].append(np.asarray(ours))
        lists[1].append(np.asarray(reference64))
        lists[2].append(np.asarray(reference32))

    def verdicts(self, dtype: str) -> list[Verdict]:
        """``judge`` on every quantity collected, npgpt2 being in ``dtype``: one Verdict each, in order."""
        return [judge(o, r, t, dtype, name, unit=unit if unit is not None else _largest(r))
                for name, (o, r, t, unit) in self.found.items()]


def _largest(arrays) -> float:
    return max(float(np.abs(a).max(initial=0.0)) for a in arrays)


def require_torch():
    """(torch, transformers), or ``ReferenceUnavailable`` naming the extra to install."""
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ReferenceUnavailable(f"the parity check needs torch and transformers ({e}): {REFERENCE_EXTRA} "
                                   "(install a CPU build of torch first, e.g. torch==2.13.0)") from None
    return torch, transformers


def reference_models(folder: str) -> dict:
    """transformers' GPT2LMHeadModel (eager attention, eval mode) from ``folder`` in float32 and float64."""
    torch, transformers = require_torch()
    return {dtype: transformers.GPT2LMHeadModel.from_pretrained(
        folder, attn_implementation="eager", dtype=getattr(torch, dtype)).eval() for dtype in ("float32", "float64")}


def torch_loss(logits, tokens):
    """Mean next-token cross-entropy in the logits' own dtype (transformers' ``labels=`` path casts
    the logits to float32 first, which would make a float64 reference a float32 one).
    logits [batch, pos, d_vocab], tokens [batch, pos] (torch tensors) -> a scalar tensor"""
    import torch

    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))


def left_padded(prompts: list[np.ndarray], pad_id: int, extra: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Prompts (each [pos_i] ids) -> (tokens [n, max pos + extra], mask): each padded on the left with
    ``pad_id`` (mask 0) up to the longest plus ``extra``, so that every prompt has padding."""
    width = max(len(p) for p in prompts) + extra
    tokens = np.full((len(prompts), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(tokens)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return tokens, mask


def compare_forward(model, hf: dict, prompts: list[np.ndarray], out: Comparison) -> None:
    """Every quantity of the forward pass, each prompt alone ([1, pos]), then all of them in one
    left-padded batch whose real positions must give what each prompt gives alone."""
    import torch

    for tokens in prompts:
        tokens = tokens[None]  # [1, pos]
        logits, cache = model.run_with_cache(tokens)  # attention through the whole score matrix
        ref = {}
        for dtype, m in hf.items():
            with torch.no_grad():
                ref[dtype] = m(torch.from_numpy(tokens), output_hidden_states=True, output_attentions=True)

        def add(name, ours, pick):
            out.add(name, ours, pick(ref["float64"]).numpy(), pick(ref["float32"]).numpy())

        add("logits", model(tokens), lambda r: r.logits)  # the plain forward (blockwise attention)
        add("logits (run_with_cache)", logits, lambda r: r.logits)
        for l in range(model.cfg.n_layer):
            add(f"resid_pre {l}", cache["resid_pre", l], lambda r, l=l: r.hidden_states[l])
            add(f"pattern {l}", cache["pattern", l], lambda r, l=l: r.attentions[l])
        final = cache["ln_final.hook_normalized"] * model.weights.ln_final_w + model.weights.ln_final_b
        add("ln_final out", final, lambda r: r.hidden_states[-1])
        # the MLP's hidden activations (GELU's output), which transformers does not expose: from
        # GPT-2 written in torch. In float32 the hidden states cannot see GELU's constant off by 3e-4
        # (0.0447 for 0.044715): each MLP's error is a few float32 steps of the residual stream
        acts = {dtype: _torch_activations(model, m, tokens) for dtype, m in hf.items()}
        for l in range(model.cfg.n_layer):
            name = f"blocks.{l}.mlp.hook_post"
            out.add(f"mlp post {l}", cache[name], acts["float64"][name], acts["float32"][name])
        if tokens.shape[1] >= 2:
            t = torch.from_numpy(tokens)
            out.add("loss", model(tokens, return_type="loss"), torch_loss(ref["float64"].logits, t).numpy(),
                    torch_loss(ref["float32"].logits, t).numpy())
    # the same prompts in one left-padded batch: positions counted from each one's first real token
    pad = model.tokenizer.eot_token if model.tokenizer.eot_token < model.cfg.d_vocab else 0  # (never read)
    tokens, mask = left_padded(prompts, pad)
    padded = model(tokens, attention_mask=mask)  # [n, width, d_vocab]
    for i, p in enumerate(prompts):
        with torch.no_grad():
            alone = {dtype: m(torch.from_numpy(p[None])).logits[0].numpy() for dtype, m in hf.items()}
        out.add("logits (left-padded batch)", padded[i, mask[i] > 0], alone["float64"], alone["float32"])


def _torch_activations(model, hf_model, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Every hook point's activation of torch_gpt2 (GPT-2 in torch) on transformers' weights, in
    their dtype: {hook name: array}. tokens [batch, pos]."""
    import torch

    from .torch_gpt2 import torch_gpt2, torch_params

    acts = {}
    torch_gpt2(torch_params(hf_model), torch.from_numpy(tokens), model.cfg.n_head, model.cfg.layer_norm_epsilon, acts)
    return {name: a.detach().numpy() for name, a in acts.items()}


def compare_gradients(model, hf: dict, prompts: list[np.ndarray], out: Comparison) -> None:
    """The loss's gradients, each prompt alone: every parameter's (``value_and_grad``) against
    transformers' under torch autograd, every activation's (``run_with_cache(incl_bwd=True)``)
    against torch_gpt2's (GPT-2 in torch, each hook point kept). Torch's loss in its model's dtype."""
    import torch

    from .torch_gpt2 import torch_gpt2, torch_params
    from .weights import _BLOCK_KEYS

    top = {"wte.weight": "W_E", "wpe.weight": "W_pos", "ln_f.weight": "ln_final_w", "ln_f.bias": "ln_final_b"}

    def ours(grads, key):  # transformers' parameter name -> npgpt2's gradient of it
        if key in top:
            return getattr(grads, top[key])
        _, l, rest = key.split(".", 2)
        return getattr(grads.blocks[int(l)], _BLOCK_KEYS[rest][0])

    for tokens in prompts:
        tokens = tokens[None]  # [1, pos]
        t_tokens = torch.from_numpy(tokens)
        value, grads = model.value_and_grad(tokens)
        _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
        param_grads, act_grads, values = {}, {}, {}
        for dtype, m in hf.items():
            m.zero_grad(set_to_none=True)
            loss = torch_loss(m(t_tokens).logits, t_tokens)
            loss.backward()
            values[dtype] = loss.detach().numpy()
            param_grads[dtype] = {k.removeprefix("transformer."): p.grad.numpy() for k, p in m.named_parameters()}
            acts = {}
            torch_loss(torch_gpt2(torch_params(m), t_tokens, model.cfg.n_head, model.cfg.layer_norm_epsilon, acts),
                       t_tokens).backward()
            act_grads[dtype] = {name: a.grad.numpy() for name, a in acts.items()}
        out.add("loss (value_and_grad)", value, values["float64"], values["float32"])
        for key, g in param_grads["float64"].items():
            out.add(f"grad {key}", ours(grads, key), g, param_grads["float32"][key], unit=None)
        for name, g in act_grads["float64"].items():
            out.add(f"grad {name}", cache[name + "_grad"], g, act_grads["float32"][name], unit=None)


def check(model, texts: Sequence[str] | None = None, grad: bool = False, prepend_bos: bool = False,
          tokens: Sequence | None = None) -> list[Verdict]:
    """Judge ``model`` (in its own dtype) against transformers on the same weights: a list of
    verdicts, one per quantity. ``texts`` (default ``DEFAULT_TEXTS``) or ``tokens`` (a list of id
    sequences) are the prompts, each run alone and all of them in one left-padded batch;
    ``grad=True`` adds the loss's gradients (``compare_gradients``).

    transformers reads the model's files (``model.files``) or, for a model built in memory (a trained
    one), a copy ``save_pretrained`` writes to a temporary folder. Raises ``ReferenceUnavailable``
    when torch or transformers is missing.
    """
    require_torch()
    if tokens is not None:
        prompts = [np.asarray(model.validate_tokens(t))[0] for t in tokens]
    else:
        texts = DEFAULT_TEXTS if texts is None else texts
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"parity: text {text!r} is empty; expected a prompt of at least one token")
        prompts = [model.validate_tokens(model.to_tokens(t, prepend_bos=prepend_bos))[0] for t in texts]
    if grad and min(len(p) for p in prompts) < 2:
        raise ValueError("parity --grad: every prompt needs at least 2 tokens (the loss predicts the next one)")
    files = getattr(model, "files", None)
    with tempfile.TemporaryDirectory(prefix="npgpt2-parity-") as tmp:
        folder = os.path.dirname(files.config) if files is not None else model.save_pretrained(tmp)
        hf = reference_models(folder)
        comparison = Comparison()
        compare_forward(model, hf, prompts, comparison)
        if grad:
            compare_gradients(model, hf, prompts, comparison)
    return comparison.verdicts(str(model.dtype))


def assert_parity(model, **kwargs) -> list[Verdict]:
    """``check`` that raises AssertionError naming every failing quantity (for tests)."""
    verdicts = check(model, **kwargs)
    failing = [str(v) for v in verdicts if not v.passed]
    assert not failing, f"{len(failing)} of {len(verdicts)} quantities outside the parity bounds:\n" + "\n".join(failing)
    return verdicts
