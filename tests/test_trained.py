"""Facts that only a trained model shows, asserted on the zoo's induction model (``npgpt2.zoo``):
each analysis must find the circuit that training made, a previous-token head in layer 0 whose
output the keys of induction heads in layer 1 read (Olsson et al., 2022). Every check is also run on
the untrained model of the same shape (the recipe's initialisation, same seed), where it must fail:
a check that passes on noise proves nothing.

The checks run on the classic task, random words then the same words again, which the model was not
trained on as such (see ``npgpt2.zoo``). The model is built once per test session (900 steps; a minute or more on
2 cores; ``pytest -m trained``).
"""

import numpy as np
import pandas as pd
import pytest

from npgpt2 import metrics, training, zoo
from npgpt2.analysis import circuit_faithfulness, edge_attribution, greedy_circuit, logit_lens
from npgpt2.analysis.edges import path_patch
from npgpt2.analysis import head_detector, patching

pytestmark = pytest.mark.trained


@pytest.fixture(scope="module")
def trained():
    return zoo.induction(progress=False)


@pytest.fixture(scope="module")
def untrained():
    return training.new_model(zoo.InductionRecipe().config(), seed=0, tokenizer=zoo.induction_tokenizer(),
                              name="untrained")


def repeated(model, batch=8, period=12, prefix=4, seed=7):
    """[batch, 1 + prefix + 2 * period] rows of distinct random words, the last ``period`` repeating."""
    rng = np.random.default_rng(seed)
    return zoo.repeated_batch(rng, batch, period, prefix, model.cfg.d_vocab - 1, model.tokenizer.eot_token)


def pair(model, batch=8, period=12, prefix=4, cut=6, seed=7):
    """(clean, corrupted, answers) of ``zoo.repeat_pair``: the next word known from the first copy in
    the clean rows, from nothing in the corrupted ones."""
    return zoo.repeat_pair(np.random.default_rng(seed), batch, period, prefix, cut, model.cfg.d_vocab - 1,
                           model.tokenizer.eot_token)


def find_heads(model):
    """Head scores from ``detect_head`` on repeated random words: {"previous": [n_layer, n_head],
    "induction": [n_layer, n_head], "best_previous": (0, h), "best_induction": (1, h),
    "circuit": the layer-0 heads scoring >= 0.3 as previous-token heads and the layer-1 heads scoring
    >= 0.1 as induction heads}."""
    tokens = repeated(model, batch=1, period=12, prefix=5)[0]
    prev = head_detector.detect_head(model, tokens, "previous_token_head")
    ind = head_detector.detect_head(model, tokens, "induction_head")
    circuit = {(0, h) for h in np.nonzero(prev[0] >= 0.3)[0]} | {(1, h) for h in np.nonzero(ind[1] >= 0.1)[0]}
    return {"previous": prev, "induction": ind, "best_previous": (0, int(prev[0].argmax())),
            "best_induction": (1, int(ind[1].argmax())), "circuit": {(int(l), int(h)) for l, h in circuit}}


# ------------------------------------------------------------------------------------- the checks
# Each returns (passed, what was measured); the tests assert them on the trained model and their
# failure on the untrained one.

def check_copies_the_repeat(model):
    """The task: the loss of the repeat's words (from its second word on) is near zero."""
    tokens = repeated(model, batch=16, period=12, prefix=5)
    nll = model.loss(tokens, per_token=True)  # [batch, pos - 1]
    repeat = float(nll[:, tokens.shape[1] - 12:].mean())
    return repeat < 0.2, repeat


def check_head_detector(model):
    """The best previous-token head is in layer 0 and scores above 0.5, at least twice any layer-1
    head's previous-token score; the best induction head is in layer 1 and scores above 0.15, at least
    twice any layer-0 head's induction score. (``detect_head`` averages over every query, and only the
    repeat's half can look back to a copy: a perfect induction head scores about 0.45 here.)"""
    found = find_heads(model)
    prev, ind = found["previous"], found["induction"]
    ok = (prev[0].max() > 0.5 and prev[0].max() > 2 * prev[1].max()
          and ind[1].max() > 0.15 and ind[1].max() > 2 * ind[0].max())
    return bool(ok), {"previous": prev.round(3), "induction": ind.round(3)}


def check_induction_pattern(model):
    """Where the induction head looks from each word of the repeat: its mean attention to the word
    after that word's first occurrence."""
    (layer, head) = find_heads(model)["best_induction"]
    tokens = repeated(model, batch=8, period=12, prefix=5)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    period, n = 12, tokens.shape[1]
    q = np.arange(n - period, n - 1)  # the repeat, but its last word (whose successor is not in the first copy)
    pattern = cache["pattern", layer][:, head]  # [batch, q, k]
    mass = float(pattern[:, q, q - period + 1].mean())
    return mass > 0.5, mass


def check_patching_localises(model):
    """Patching each head's clean output into the corrupted run: the heads of the circuit restore the
    most (each other head less than a quarter of the best circuit head), the best of them over 30% of
    the clean - corrupted difference; and attribution patching agrees with the exact sweep."""
    clean, corrupted, answers = pair(model)
    metric = metrics.LogProb(answers)
    _, clean_cache = model.run_with_cache(clean)
    exact = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric, progress=False)
    base = float(metric(model(corrupted)))
    gain = exact - base  # [layer, head]
    estimate = patching.get_attr_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    corr = float(np.corrcoef(gain.ravel(), estimate.ravel())[0, 1])
    circuit = find_heads(model)["circuit"]
    clean_value = float(metric(model(clean)))
    inside = [gain[h] for h in circuit]
    outside = [gain[l, h] for l in range(gain.shape[0]) for h in range(gain.shape[1]) if (l, h) not in circuit]
    ok = bool(inside) and max(inside) > 0.3 * (clean_value - base) and max(outside) < 0.25 * max(inside)
    return ok, {"gain": gain.round(3), "circuit": sorted(circuit), "correlation": corr, "clean": clean_value,
                "corrupted": base}


def check_eap_ig_circuit(model, n_edges=40):
    """EAP-IG: among the top edges, a previous-token head -> induction head edge through the key input,
    and an induction head -> logits edge; the greedy circuit of the top 40 edges (of the graph's 110:
    the trained model spreads induction over several heads, and each needs its query, key, value and
    output edges) recovers >= 80% of the behaviour (faithfulness; measured 0.98)."""
    clean, corrupted, answers = pair(model)
    metric = metrics.LogProb(answers)
    scores = edge_attribution(model, clean, corrupted, metric, method="eap-ig", ig_steps=5)
    circuit = find_heads(model)["circuit"]
    prev_names = {f"L0H{h}" for l, h in circuit if l == 0}
    ind_names = {f"L1H{h}" for l, h in circuit if l == 1}
    top = scores.head(n_edges)
    k_edge = (top["upstream"].isin(prev_names) & top["downstream"].isin(ind_names) & (top["input"] == "k")).any()
    out_edge = (top["upstream"].isin(ind_names) & (top["downstream"] == "logits")).any()
    circuit = greedy_circuit(scores, n_edges)
    faithfulness = circuit_faithfulness(model, clean, corrupted, circuit, metric)
    ok = bool(k_edge and out_edge and faithfulness >= 0.8)
    return ok, {"k_edge": bool(k_edge), "out_edge": bool(out_edge), "faithfulness": faithfulness,
                "edges": len(circuit), "top": top}


def _normalized(x):
    """A layer norm without its gain and bias: what a block reads of a direction (rows of x)."""
    centred = x - x.mean(axis=-1, keepdims=True)
    return centred / np.sqrt((centred ** 2).mean(axis=-1, keepdims=True) + 1e-5)


def check_ov_copies(model):
    """The induction heads' full OV circuit, summed over them: a word's embedding (through layer 1's
    first layer norm) -> W_V W_O -> the final layer norm's gain -> W_U. Each word, attended to, should
    raise its own logit among the highest: the share of words whose own logit is in their row's top 5
    (above half; chance is 5 / 299; measured 0.75)."""
    circuit = find_heads(model)["circuit"]
    heads = [h for l, h in circuit if l == 1] or [find_heads(model)["best_induction"][1]]
    w, words = model.weights, np.arange(model.cfg.d_vocab - 1)
    E = _normalized(model.W_E[words]) * w.blocks[1].ln1_w  # [word, d_model]
    written = sum(E @ model.W_V[1, h] @ model.W_O[1, h] for h in heads)  # [word, d_model]
    full = (written * w.ln_final_w) @ model.W_U[:, words]  # [word, word]
    own = np.take_along_axis(full, words[:, None], axis=1)  # [word, 1]
    share = float(((full > own).sum(axis=1) < 5).mean())
    return share > 0.5, share


def check_k_composition(model):
    """Path patching (Wang et al., 2022): the previous-token heads' corrupted outputs fed to the
    induction heads through one input at a time, everything else clean (direct paths only: what goes
    through layer 0's MLP is not patched). K-composition: through the keys it undoes a good part of
    the behaviour (over a fifth of clean - corrupted), through the queries or the values less than half
    of what it undoes through the keys."""
    circuit = find_heads(model)["circuit"]
    senders = [f"L0H{h}" for l, h in circuit if l == 0]
    receivers = [f"L1H{h}" for l, h in circuit if l == 1]
    if not senders or not receivers:
        return False, {"circuit": sorted(circuit)}
    clean, corrupted, answers = pair(model)
    metric = metrics.LogProb(answers)
    clean_value, corrupted_value = float(metric(model(clean))), float(metric(model(corrupted)))
    effect = {kind: clean_value - path_patch(model, clean, corrupted, metric, senders, [(r, kind) for r in receivers])
              for kind in ("q", "k", "v")}
    total = clean_value - corrupted_value
    ok = effect["k"] > 0.2 * total and max(effect["q"], effect["v"]) < effect["k"] / 2
    return bool(ok), {"effect": effect, "clean - corrupted": total}


def check_logit_lens_jump(model):
    """The rank of the word to be copied, read off the residual stream before and after layer 1
    (the induction layer), on the repeat."""
    tokens = repeated(model, batch=4, period=12, prefix=3)
    lens = logit_lens(model, tokens)
    n = tokens.shape[1]
    on_repeat = lens[(lens["position"] >= n - 12) & (lens["position"] < n - 1)]
    before = on_repeat[on_repeat["layer"] == "1_pre"]["next_rank"].median()
    after = on_repeat[on_repeat["layer"] == "final_post"]["next_rank"].median()
    return bool(before > 20 and after == 0), {"before": float(before), "after": float(after)}


CHECKS = [check_copies_the_repeat, check_head_detector, check_induction_pattern, check_patching_localises,
          check_eap_ig_circuit, check_ov_copies, check_k_composition, check_logit_lens_jump]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_trained_model_shows_it(trained, check):
    ok, measured = check(trained)
    assert ok, measured


def test_attribution_patching_agrees_with_exact_patching(trained):
    """Attribution patching's estimate of each head's effect against the exact patch, on the
    log-probability of the copied word: correlation 0.992 measured (seed 0)."""
    clean, corrupted, answers = pair(trained)
    metric = metrics.LogProb(answers)
    _, clean_cache = trained.run_with_cache(clean)
    table = patching.attribution_vs_exact(trained, corrupted, clean_cache, metric, "attn_head_out_all_pos")
    assert table.attrs["correlation"] >= 0.9, table.attrs["correlation"]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_untrained_model_does_not(untrained, check):
    ok, measured = check(untrained)
    assert not ok, measured


# ------------------------------------------------------------------------------ parity, trained
# A trained model has magnitudes random ones lack (peaked attention, a sink on <|endoftext|>); the
# parity judge must pass it as it passes random weights (needs torch and transformers).

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parity_with_transformers_on_the_trained_model(trained, dtype):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from npgpt2.parity import assert_parity

    model = trained if dtype == "float32" else zoo.induction(dtype="float64", progress=False)
    prompts = list(repeated(model, batch=2, period=10, prefix=3))
    assert_parity(model, tokens=prompts, grad=True)


def test_parity_command_passes_on_the_built_model(trained, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import json
    import subprocess
    import sys

    folder = trained.files.source
    text = "king queen cat dog tree king queen cat dog"
    for dtype in ("float32", "float64"):
        done = subprocess.run([sys.executable, "-m", "npgpt2", "parity", text, "-m", folder, "--dtype", dtype,
                               "--grad", "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        report = json.loads(done.stdout)
        assert report["passed"] and report["grad"] and len(report["quantities"]) > 10


# ------------------------------------------------------------------------------ the circuit lesson

def test_induction_circuit_walkthrough_finds_the_circuit(trained, tmp_path):
    """examples/induction_circuit.py, on the trained model: each of its steps finds what is there."""
    import os

    from npgpt2.testing import run_walkthrough

    path = os.path.join(os.path.dirname(__file__), "..", "examples", "induction_circuit.py")
    r = run_walkthrough(path, MODEL=trained, OUT_DIR=str(tmp_path))["results"]
    heads = find_heads(trained)
    assert set(r["previous"]) == {f"L{l}H{h}" for l, h in heads["circuit"] if l == 0}
    assert set(r["induction"]) == {f"L{l}H{h}" for l, h in heads["circuit"] if l == 1}
    # exact patching: the heads that restore most are the induction heads, and attribution agrees
    best = r["patching"].sort_values("exact_change", ascending=False).head(len(r["induction"]))
    assert {f"L{l}H{h}" for l, h in zip(best["layer"], best["head"])} == set(r["induction"])
    assert r["correlation"] >= 0.9, r["correlation"]
    # EAP-IG: previous-token -> induction through the key in the top 20, induction -> logits in the top 10
    assert min(r["k_edge_ranks"]) <= 20 and min(r["out_edge_ranks"]) <= 10, (r["k_edge_ranks"], r["out_edge_ranks"])
    # the smallest circuit restores >= 0.8 exactly, with at most half the graph's edges
    assert r["faithfulness"] >= 0.8 and len(r["circuit"]) <= len(r["edges"]) // 2, r["curve"]
    # path patching: K-composition
    undone, total = r["path_patching"], r["clean"] - r["corrupted"]
    assert undone["k"] > 0.2 * total and max(undone["q"], undone["v"]) < undone["k"] / 2, undone
    assert (tmp_path / "induction_circuit.png").read_bytes()[:4] == b"\x89PNG"


def test_plain_call_cache_and_hooks_give_the_same_bits(trained):
    # 16 x 29 rows: the fast path's size; every way of running it must give the same float32 bits
    tokens = np.concatenate([repeated(trained, batch=8, seed=s) for s in (1, 2)])
    plain = trained(tokens)
    cached, _ = trained.run_with_cache(tokens)
    hooked = trained.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", lambda a, hook: None)])
    np.testing.assert_array_equal(cached, plain)
    np.testing.assert_array_equal(hooked, plain)
