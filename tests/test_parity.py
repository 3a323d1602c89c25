"""``npgpt2 parity`` never cries wolf, and still catches real defects (``pytest -m reference``).

The judge (``npgpt2.parity``) must pass the unchanged code on random and realistic-magnitude
weights (``realistic_state_dict``: position 0's residual norm near 3,000, outlier dimensions,
attention sinks, logits near -100) at gpt2-small's and gpt2-medium's shapes and on a few layers of
gpt2-xl's, in float32 and float64, forward and gradients; and it must fail every plausible bug of
tests/mutants.py, each applied to a copy of the code it breaks, on the realistic checkpoint.

Prompts are random token ids over a vocabulary of 8,192 (the vocabulary's size changes nothing
the judge looks at, and keeps float64 copies of gpt2-xl's embedding small); the command-line tests
(test_reference_live.py) run the default sentences with GPT-2's vocabulary.

When the trained induction model (``npgpt2.zoo.induction()``) exists, its test is one line here:
``assert_parity(npgpt2.zoo.induction(dtype=dtype), tokens=PROMPTS, grad=True)``.
"""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import npgpt2  # noqa: E402
from npgpt2.config import KNOWN_SIZES  # noqa: E402
from npgpt2.parity import Verdict, assert_parity, check  # noqa: E402
from npgpt2.testing import random_state_dict, realistic_state_dict, realistic_statistics, write_checkpoint  # noqa: E402

import mutants  # noqa: E402

pytestmark = pytest.mark.reference
VOCAB = 8192
PROMPTS = [np.random.default_rng(0).integers(0, VOCAB, n) for n in (9, 14)]


def checkpoint(tmp_path_factory, weights: str, size: str, n_layer: int | None = None) -> str:
    """A checkpoint folder: ``weights`` "random" or "realistic", at the shape of ``size`` (a known
    GPT-2), with ``n_layer`` blocks (default: all of them)."""
    layers, n_head, n_embd = KNOWN_SIZES[size]
    cfg = npgpt2.GPT2Config(n_layer=n_layer or layers, n_head=n_head, n_embd=n_embd, n_ctx=256, vocab_size=VOCAB)
    build = realistic_state_dict if weights == "realistic" else random_state_dict
    return write_checkpoint(tmp_path_factory.mktemp(f"{weights}-{size}"), cfg, build(cfg, seed=0),
                            tokenizer_files=False)


def show(title: str, verdicts: list[Verdict]) -> None:
    print(f"\n{title}\n{Verdict.header()}")
    for v in verdicts:
        print(v.line())


# ------------------------------------------------------------------ the unchanged code passes
CASES = [
    ("random", "gpt2", None), ("realistic", "gpt2", 4),
    pytest.param("random", "gpt2-medium", 6, marks=pytest.mark.slow),
    pytest.param("realistic", "gpt2-medium", 4, marks=pytest.mark.slow),
    pytest.param("random", "gpt2-xl", 2, marks=pytest.mark.slow),
    pytest.param("realistic", "gpt2-xl", 2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("weights,size,n_layer", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_unchanged_code_passes_forward_and_gradients(tmp_path_factory, weights, size, n_layer, dtype):
    folder = checkpoint(tmp_path_factory, weights, size, n_layer)
    model = npgpt2.from_pretrained(folder, dtype=dtype)
    verdicts = assert_parity(model, tokens=PROMPTS, grad=True)
    show(f"{weights} {size} ({model.cfg.n_layer} layers), {dtype}", verdicts)
    names = [v.name for v in verdicts]
    # every kind of quantity was judged
    for expected in ("logits", "logits (left-padded batch)", f"pattern {model.cfg.n_layer - 1}", "ln_final out",
                     "mlp post 0", "loss", "loss (value_and_grad)", "grad wte.weight", "grad h.0.attn.c_attn.weight",
                     "grad blocks.0.attn.hook_pattern", "grad hook_embed"):
        assert expected in names, expected
    assert len(verdicts) > 20 * model.cfg.n_layer


# ------------------------------------------------------------------ every mutant fails
@pytest.fixture(scope="module")
def realistic(tmp_path_factory):
    """gpt2-small's width and heads, three blocks: many heads after layer 0 are attention sinks."""
    folder = checkpoint(tmp_path_factory, "realistic", "gpt2", 3)
    stats = realistic_statistics(npgpt2.from_pretrained(folder), np.stack([PROMPTS[1]]))
    assert stats["pos0_resid_norm"] > 2400 and stats["sink_heads_after_layer_0"] >= 0.6, stats
    return folder


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("mutant", mutants.FORWARD, ids=lambda m: m.name)
def test_forward_mutant_fails(realistic, monkeypatch, mutant, dtype, request):
    if mutant.name.startswith("softmax") and dtype == "float64":
        # not a bug in float64 at these scores: exp overflows above 709 there, not 88.7
        request.applymarker(pytest.mark.xfail(strict=True, reason="float64's exp does not overflow at scores "
                                              "of 120: the softmax without its max shift is right there"))
    model = npgpt2.from_pretrained(realistic, dtype=dtype)
    mutants.apply(mutant, monkeypatch)
    verdicts = check(model, tokens=PROMPTS)
    failing = [v for v in verdicts if not v.passed]
    show(f"{mutant.name}, {dtype}: {len(failing)} of {len(verdicts)} fail", failing or verdicts)
    assert failing, f"the judge passed {mutant.name!r} ({dtype})"


@pytest.mark.slow
@pytest.mark.parametrize("mutant", mutants.GRADIENT, ids=lambda m: m.name)
def test_gradient_mutant_fails(realistic, monkeypatch, mutant):
    model = npgpt2.from_pretrained(realistic, dtype="float32")
    mutants.apply(mutant, monkeypatch)
    verdicts = check(model, tokens=PROMPTS[1:], grad=True)
    failing = [v for v in verdicts if not v.passed]
    show(f"{mutant.name}, float32: {len(failing)} of {len(verdicts)} fail", failing)
    assert failing, f"the judge passed {mutant.name!r}"
    # the forward pass is untouched: only gradients (and the loss of value_and_grad) fail
    assert all(v.name.startswith(("grad ", "loss (value_and_grad)")) for v in failing), \
        [v.name for v in failing]


def test_json_output_and_exit_codes(tmp_path, monkeypatch, capsys):
    """--json: one object per quantity with its errors, ratios, worst row and verdict; exit 0 on
    pass, 1 on fail (here with the causal mask off by one)."""
    import json

    from npgpt2 import cli

    cfg = npgpt2.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=64)  # GPT-2's vocabulary: text works
    folder = write_checkpoint(tmp_path / "ckpt", cfg, realistic_state_dict(cfg, seed=5))
    assert cli.main(["parity", "--model", str(folder), "--json", "--grad"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] is True and doc["dtype"] == "float32" and doc["grad"] is True
    q = {d["name"]: d for d in doc["quantities"]}
    assert set(q["logits"]) >= {"error", "float32_error", "ratio_typical", "ratio_worst", "worst_row", "verdict"}
    assert q["pattern 1"]["verdict"] == "pass" and q["grad wte.weight"]["verdict"] == "pass"
    mutants.apply(mutants.FORWARD[3], monkeypatch)  # the causal mask off by one
    assert cli.main(["parity", "--model", str(folder), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["passed"] is False and q["pattern 1"]["verdict"] == "pass"
    assert {d["name"]: d for d in doc["quantities"]}["pattern 1"]["verdict"] == "fail"
