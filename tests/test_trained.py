"""Facts that only a trained model shows, asserted on the zoo's induction model (``npgpt2.zoo``):
each analysis must find the circuit that training made. Every check is also run on the untrained
model of the same shape (GPT-2's initialisation, same seed), where it must fail: a check that passes
on noise proves nothing.

The model is built once per test session (about a minute on 2 cores; ``pytest -m trained``).
"""

import numpy as np
import pandas as pd
import pytest

from npgpt2 import metrics, training, zoo
from npgpt2.analysis import (circuit_faithfulness, edge_attribution, greedy_circuit, logit_lens,
                             ov_circuit)
from npgpt2.analysis import head_detector, patching

pytestmark = pytest.mark.trained


@pytest.fixture(scope="module")
def trained():
    return zoo.induction(progress=False)


@pytest.fixture(scope="module")
def untrained():
    return training.new_model(zoo.InductionRecipe().config(), seed=0, tokenizer=zoo.induction_tokenizer(),
                              name="untrained")


@pytest.fixture(scope="module")
def heads(trained):
    """(previous-token head, induction head) of the trained model, as the detector finds them."""
    return find_heads(trained)


def repeated(model, batch=8, period=12, prefix=4, seed=7):
    """[batch, 1 + prefix + 2 * period] rows of distinct random words, the last ``period`` repeating."""
    rng = np.random.default_rng(seed)
    return zoo.repeated_batch(rng, batch, period, prefix, model.cfg.d_vocab - 1, model.tokenizer.eot_token)


def pair(model, batch=8, period=12, prefix=4, cut=6, seed=7):
    """(clean, corrupted, answers): clean rows end ``cut`` words into the repeat, so the next word is
    known from the first copy; corrupted rows have other words in the first copy, so nothing earlier
    says what comes next. answers [batch]: the word the clean rows should predict."""
    clean = repeated(model, batch, period, prefix, seed)
    n = clean.shape[1]
    first = slice(1 + prefix, 1 + prefix + period)
    corrupted = clean.copy()
    rng = np.random.default_rng(seed + 1)
    for row, words in zip(corrupted, clean):
        unused = np.setdiff1d(np.arange(model.cfg.d_vocab - 1), words)
        row[first] = rng.choice(unused, period, replace=False)
    end = n - period + cut
    return clean[:, :end], corrupted[:, :end], clean[:, end]


def find_heads(model):
    """The best previous-token head in layer 0 and the best induction head in layer 1, by
    ``detect_head`` on repeated random words: ((layer, head), score) each."""
    tokens = repeated(model, batch=1, period=20, prefix=0)[0]
    prev = head_detector.detect_head(model, tokens, "previous_token_head")
    ind = head_detector.detect_head(model, tokens, "induction_head")
    p = (0, int(prev[0].argmax()))
    i = (1, int(ind[1].argmax()))
    return {"previous": (p, float(prev[p]), np.delete(prev.ravel(), p[0] * model.cfg.n_head + p[1])),
            "induction": (i, float(ind[i]), np.delete(ind.ravel(), i[0] * model.cfg.n_head + i[1]))}


# ------------------------------------------------------------------------------------- the checks
# Each returns (passed, what was measured); the tests assert them on the trained model and their
# failure on the untrained one.

def check_head_detector(model):
    found = find_heads(model)
    (_, p_score, p_rest), (_, i_score, i_rest) = found["previous"], found["induction"]
    ok = p_score > 0.5 and i_score > 0.5 and p_score > 2 * p_rest.max() and i_score > 2 * i_rest.max()
    return ok, found


def check_induction_pattern(model):
    """Where the induction head looks from each word of the repeat: its mean attention to the word
    after that word's first occurrence."""
    (layer, head) = find_heads(model)["induction"][0]
    tokens = repeated(model, batch=8, period=15, prefix=5)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    period, n = 15, tokens.shape[1]
    q = np.arange(n - period, n - 1)  # the repeat, but its last word (whose successor is not in the first copy)
    pattern = cache["pattern", layer][:, head]  # [batch, q, k]
    mass = float(pattern[:, q, q - period + 1].mean())
    return mass > 0.5, mass


def check_patching_localises(model):
    """Patching each head's clean output into the corrupted run: the two heads of the circuit restore
    the most, the others little; and attribution patching agrees with the exact sweep."""
    clean, corrupted, answers = pair(model)
    metric = metrics.LogProb(answers)
    _, clean_cache = model.run_with_cache(clean)
    exact = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)  # [layer, head]
    base = float(metric(model(corrupted)))
    gain = exact - base
    estimate = patching.get_attr_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    corr = float(np.corrcoef(gain.ravel(), estimate.ravel())[0, 1])
    found = find_heads(model)
    circuit = {found["previous"][0], found["induction"][0]}
    top2 = {tuple(int(i) for i in np.unravel_index(k, gain.shape)) for k in np.argsort(-gain.ravel())[:2]}
    clean_value = float(metric(model(clean)))
    ok = top2 == circuit and gain[found["induction"][0]] > 0.5 * (clean_value - base)
    return ok, {"gain": gain, "correlation": corr, "clean": clean_value, "corrupted": base}


def check_eap_ig_circuit(model, n_edges=12):
    clean, corrupted, answers = pair(model)
    metric = metrics.LogProb(answers)
    scores = edge_attribution(model, clean, corrupted, metric, method="eap-ig", ig_steps=5)
    found = find_heads(model)
    (lp, hp), (li, hi) = found["previous"][0], found["induction"][0]
    prev_name, ind_name = f"L{lp}H{hp}", f"L{li}H{hi}"
    top = scores.head(n_edges)
    k_edge = ((top["upstream"] == prev_name) & (top["downstream"] == ind_name) & (top["input"] == "k")).any()
    out_edge = ((top["upstream"] == ind_name) & (top["downstream"] == "logits")).any()
    circuit = greedy_circuit(scores, n_edges)
    faithfulness = circuit_faithfulness(model, clean, corrupted, circuit, metric)
    ok = bool(k_edge and out_edge and faithfulness >= 0.8)
    return ok, {"k_edge": bool(k_edge), "out_edge": bool(out_edge), "faithfulness": faithfulness,
                "edges": len(circuit), "top": top}


def check_ov_copies(model):
    """The induction head's full OV circuit W_E W_V W_O W_U (through the final layer norm's scale
    left out) has a dominant positive diagonal: each word, attended to, raises its own logit most."""
    (layer, head) = find_heads(model)["induction"][0]
    words = np.arange(model.cfg.d_vocab - 1)
    full = (ov_circuit(model)[layer, head].AB.__rmatmul__(model.W_E[words]) @ model.W_U[:, words])  # [word, word]
    diagonal_top = float((full.argmax(axis=1) == words).mean())
    return diagonal_top > 0.9, diagonal_top


def check_qk_through_previous_token_head(model):
    """K-composition: the induction head's query, from word A, matches the key of a position whose
    previous word was A, as the previous-token head writes it. Scored as the share of words whose own
    embedding, passed through the previous-token head's OV into the key side, is the best match."""
    found = find_heads(model)
    (lp, hp), (li, hi) = found["previous"][0], found["induction"][0]
    words = np.arange(model.cfg.d_vocab - 1)
    E = model.W_E[words]
    queries = E @ model.W_Q[li, hi]  # [word, d_head]
    moved = E @ model.W_V[lp, hp] @ model.W_O[lp, hp]  # [word, d_model]: what the head writes from it
    keys = moved @ model.W_K[li, hi]  # [word, d_head]
    scores = queries @ keys.T  # [query word, previous word]
    share = float((scores.argmax(axis=1) == words).mean())
    return share > 0.9, share


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


CHECKS = [check_head_detector, check_induction_pattern, check_patching_localises, check_eap_ig_circuit,
          check_ov_copies, check_qk_through_previous_token_head, check_logit_lens_jump]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__[len("check_"):])
def test_trained_model_shows_it(trained, check):
    ok, measured = check(trained)
    assert ok, measured


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
