"""Edge attribution against exact edge patching: each EAP score is the derivative of the exact
patched metric along the edge's interpolation (finite differences, float64)."""

import numpy as np
import pandas as pd
import pytest

import npgpt2
from npgpt2 import metrics
from npgpt2.analysis import edges as E

V = 50257


def test_gpt2_small_has_32491_edges():
    df = E.graph_edges(npgpt2.GPT2Config())
    assert len(df) == 32491 and not df.duplicated().any()
    # a head reads earlier layers only; an MLP also its own layer's heads
    reads = set(df.loc[(df["downstream"] == "L3H0") & (df["input"] == "q"), "upstream"])
    assert reads == {"embed"} | {f"L{l}H{h}" for l in range(3) for h in range(12)} | {"mlp0", "mlp1", "mlp2"}
    assert {"L3H1", "mlp2"} <= set(df.loc[df["downstream"] == "mlp3", "upstream"])
    assert "L3H1" not in set(df.loc[df["downstream"] == "L3H0", "upstream"])


@pytest.fixture(scope="module")
def pair(model64):
    rng = np.random.default_rng(0)
    clean = rng.integers(0, V, (2, 6))
    corrupted = clean.copy()
    corrupted[:, 1] = rng.integers(0, V, 2)
    return clean, corrupted, metrics.logit_diff(11, 12)


def _outputs(model, tokens, hooks=()):
    with model.hooks(hooks):
        _, cache = model.run_with_cache(tokens, names_filter=E._is_output_hook)
    return dict(zip([n for n, _ in E._nodes(model.cfg)], E._node_outputs(model, cache)))


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_scores_are_derivatives_of_the_exact_edge_patch(model64, pair, method):
    clean, corrupted, metric = pair
    df = E.edge_attribution(model64, clean, corrupted, metric, method=method, ig_steps=1)
    assert len(df) == len(E.graph_edges(model64.cfg))
    assert (np.abs(df["score"]).diff().dropna() <= 0).all()  # sorted by |score|
    clean_out, corrupted_out = _outputs(model64, clean), _outputs(model64, corrupted)
    # eap: the gradient on the corrupted run; eap-ig with one step: on the corrupted run whose token
    # embeddings are the clean ones (alpha = 1)
    hooks = [] if method == "eap" else [("hook_embed", lambda a, h: model64.W_E[clean])]
    here = _outputs(model64, corrupted, hooks)
    for row in df.sample(6, random_state=1).itertuples():
        edge = (row.upstream, row.downstream, row.input)
        change = clean_out[edge[0]] - corrupted_out[edge[0]]

        def f(alpha):
            with model64.hooks(hooks):
                logits = E.run_with_edge_values(model64, corrupted, {edge: here[edge[0]] + alpha * change})
            return metric(logits)

        fd = (f(1e-6) - f(-1e-6)) / 2e-6
        # relative to the largest score: a tiny score's difference is rounding in the metric
        assert abs(row.score - fd) <= 1e-6 * max(abs(fd), np.abs(df["score"]).max()), edge


def test_exact_patching_of_all_and_no_edges(model64, pair):
    clean, corrupted, metric = pair
    every = E.graph_edges(model64.cfg)
    assert E.circuit_faithfulness(model64, clean, corrupted, every, metric) == pytest.approx(1, abs=1e-9)
    assert E.circuit_faithfulness(model64, clean, corrupted, [], metric) == pytest.approx(0, abs=1e-9)
    # corrupting every edge into the logits alone is the corrupted run's final stream: its metric
    into_logits = every[every["downstream"] == "logits"]
    assert E.patch_edges(model64, clean, corrupted, into_logits, metric, keep="rest") == pytest.approx(
        metric(model64(corrupted)), abs=1e-9)
    # an edge whose value is what its node wrote changes nothing
    out = _outputs(model64, clean)
    same = E.run_with_edge_values(model64, clean, {("embed", "L1H2", "k"): out["embed"]})
    np.testing.assert_allclose(same, model64(clean), atol=1e-12)
    with pytest.raises(ValueError, match="does not read"):
        E.run_with_edge_values(model64, clean, {("L1H0", "L0H1", "q"): out["embed"]})


def test_greedy_circuit_prunes_what_no_longer_reaches_the_logits():
    scores = pd.DataFrame([("L1H0", "logits", "logits", 5.0), ("embed", "L1H0", "q", 4.0),
                           ("L0H1", "mlp0", "mlp", 3.0), ("embed", "L0H1", "v", 2.0), ("embed", "logits", "logits", 0.1)],
                          columns=["upstream", "downstream", "input", "score"])
    kept = E.greedy_circuit(scores, 4)
    # mlp0 feeds nothing kept, so L0H1 -> mlp0 goes, then embed -> L0H1
    assert set(map(tuple, kept[["upstream", "downstream"]].to_numpy())) == {("L1H0", "logits"), ("embed", "L1H0")}


@pytest.mark.parametrize("target", [0.5, 0.9, 10.0])
def test_smallest_circuit_is_the_first_size_that_reaches_the_target(model64, pair, target):
    clean, corrupted, metric = pair
    scores = E.edge_attribution(model64, clean, corrupted, metric)
    circuit, curve = E.smallest_circuit(model64, clean, corrupted, scores, metric, target=target, step=7)
    sizes = list(curve["top_edges"])
    assert sizes == [min(7 * (i + 1), len(scores)) for i in range(len(sizes))]
    for size, faithfulness in zip(sizes, curve["faithfulness"]):  # each size evaluated exactly
        again = E.circuit_faithfulness(model64, clean, corrupted, E.greedy_circuit(scores, size), metric)
        assert faithfulness == pytest.approx(again, rel=1e-12, abs=1e-12)
    assert (curve["faithfulness"].iloc[:-1] < target).all()  # none before the last reached it
    if curve["faithfulness"].iloc[-1] >= target:
        assert len(circuit) == curve["edges"].iloc[-1]
    else:  # no size reached it (10.0): every edge was tried
        assert sizes[-1] == len(scores) and len(circuit) == curve["edges"].iloc[-1]


@pytest.mark.parametrize("bad, match", [({"step": 0}, "step=0"), ({"target": float("nan")}, "target=nan")])
def test_smallest_circuit_refuses_bad_arguments(model64, pair, bad, match):
    clean, corrupted, metric = pair
    scores = E.edge_attribution(model64, clean, corrupted, metric)
    with pytest.raises(ValueError, match=match):
        E.smallest_circuit(model64, clean, corrupted, scores, metric, **bad)


def test_path_patching_into_the_logits_is_the_direct_effect(model64, pair):
    from by_hand import layer_norm

    clean, corrupted, metric = pair
    _, c = model64.run_with_cache(clean, names_filter="blocks.1.hook_resid_post")
    clean_out, corrupted_out = _outputs(model64, clean), _outputs(model64, corrupted)
    w = model64.weights
    for senders in (["L0H2"], ["L1H3", "mlp0", "embed"]):
        resid = c["blocks.1.hook_resid_post"] + sum(corrupted_out[s] - clean_out[s] for s in senders)
        by_hand = layer_norm(resid, w.ln_final_w, w.ln_final_b, model64.cfg.eps) @ model64.W_U
        assert E.path_patch(model64, clean, corrupted, metric, senders, "logits") == pytest.approx(
            metric(by_hand), abs=1e-10)


def test_path_patching_into_one_value_input_changes_only_that_head(model64, pair):
    clean, corrupted, metric = pair
    seen = {}
    record = [(f"blocks.1.attn.hook_{x}", lambda a, h, x=x: seen.__setitem__(x, a.copy())) for x in ("pattern", "z")]
    with model64.hooks(record):
        model64(clean)
    plain = dict(seen)
    with model64.hooks(record):
        value = E.path_patch(model64, clean, corrupted, metric, "L0H1", ("L1H2", "v"))
    # (the patched run sums each head's result: rounding differs from the plain matmul by ~1e-16)
    np.testing.assert_allclose(seen["pattern"], plain["pattern"], atol=1e-12)  # no query or key moved
    others = [h for h in range(4) if h != 2]
    np.testing.assert_allclose(seen["z"][:, :, others], plain["z"][:, :, others], atol=1e-12)
    assert np.abs(seen["z"][:, :, 2] - plain["z"][:, :, 2]).max() > 1e-6
    assert value != pytest.approx(metric(model64(clean)), abs=1e-9)
    sweep = E.path_patch_heads(model64, clean, corrupted, metric, ("L1H2", "v"), progress=False)
    assert sweep[0, 1] == pytest.approx(value) and np.isnan(sweep[1]).all()


def test_path_patching_chosen_heads_is_the_sweep_at_those_heads(model64, pair):
    clean, corrupted, metric = pair
    every = E.path_patch_heads(model64, clean, corrupted, metric, "logits", progress=False)
    chosen = E.path_patch_heads(model64, clean, corrupted, metric, "logits", heads=["L1H3", (0, 2)], progress=False)
    assert chosen[1, 3] == every[1, 3] and chosen[0, 2] == every[0, 2]
    assert chosen[1, 3] == E.path_patch(model64, clean, corrupted, metric, "L1H3", "logits")
    assert np.isnan(np.delete(chosen.ravel(), [1 * 4 + 3, 0 * 4 + 2])).all()  # the heads not asked for
    for bad in ("L2H0", (0, 4), "mlp0"):
        with pytest.raises(ValueError, match=r"head .* is not in the model: .*layer 0\.\.1, head 0\.\.3"):
            E.path_patch_heads(model64, clean, corrupted, metric, "logits", heads=[bad], progress=False)


def test_circuit_command_and_picture(tiny_dir, model, capsys, tmp_path):
    from npgpt2 import cli

    png = tmp_path / "circuit.png"
    clean = "When Mary and John went to the store, John gave a drink to"
    corrupted = "When Alice and Bob went to the store, Carl gave a drink to"
    assert cli.main(["circuit", clean, corrupted, "-m", tiny_dir, "--answer", " Mary", "--wrong", " John",
                     "--method", "eap", "--top", "8", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    metric = metrics.logit_diff(" Mary", " John")
    kept = E.greedy_circuit(E.edge_attribution(model, model.to_tokens(clean), model.to_tokens(corrupted), metric), 8)
    printed = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in
               set(kept["upstream"]) and len(line.split()) == 4]
    assert [(u, d, i) for u, d, i, _ in printed] == list(map(tuple, kept[["upstream", "downstream", "input"]].to_numpy()))
    faithfulness = E.circuit_faithfulness(model, model.to_tokens(clean), model.to_tokens(corrupted), kept, metric)
    assert f"{faithfulness:.3f}" in out
    assert png.read_bytes()[:4] == b"\x89PNG"

    # the same circuit as an offline HTML page: the picture inline, every kept edge in its table
    page = tmp_path / "circuit.html"
    assert cli.main(["circuit", clean, corrupted, "-m", tiny_dir, "--answer", " Mary", "--wrong", " John",
                     "--method", "eap", "--top", "8", "--html", str(page)]) == 0
    capsys.readouterr()
    from browser import texts

    dom = page.read_text(encoding="utf-8")
    assert dom.count("<svg") == 1 and "<script" not in dom and "<link" not in dom and "src=" not in dom
    cells = texts(dom, "td")
    table = [cells[i:i + 4] for i in range(0, len(cells), 4)]
    assert [tuple(r[:3]) for r in table] == list(map(tuple, kept[["upstream", "downstream", "input"]].to_numpy()))
    assert [float(r[3]) for r in table] == pytest.approx(kept["score"].to_numpy(), rel=1e-3)
    picture = dom[dom.index("<svg"):dom.index("</svg>")]
    for name in set(kept["upstream"]) | set(kept["downstream"]):
        assert f"<!-- {name} -->" in picture  # each node labelled in the picture (matplotlib's text)
    assert cli.main(["circuit", clean, "Short", "-m", tiny_dir, "--answer", " Mary", "--wrong", " John"]) == 2


def test_eap_ig_steps_stacked_in_one_run_equal_one_run_per_step(model64, pair, monkeypatch):
    # EAP-IG stacks its interpolation steps into one batch: the same scores as one run per step,
    # and as the mean over the steps of gradient . change taken one hooked run at a time
    clean, corrupted, metric = pair
    stacked = E.edge_attribution(model64, clean, corrupted, metric, method="eap-ig", ig_steps=3)
    monkeypatch.setattr(E, "_IG_ROWS", 1)  # one step per run
    separate = E.edge_attribution(model64, clean, corrupted, metric, method="eap-ig", ig_steps=3)
    key = ["upstream", "downstream", "input"]
    a, b = stacked.sort_values(key).reset_index(drop=True), separate.sort_values(key).reset_index(drop=True)
    np.testing.assert_allclose(a["score"], b["score"], rtol=0, atol=1e-12 * np.abs(b["score"]).max())

    clean_out, corrupted_out = _outputs(model64, clean), _outputs(model64, corrupted)
    names = [n for n, _ in E._nodes(model64.cfg)]
    change = np.stack([clean_out[n] - corrupted_out[n] for n in names]).reshape(len(names), -1)
    by_step = np.zeros((len(E._inputs(model64.cfg)), len(names)))
    _, c_clean = model64.run_with_cache(clean, names_filter="hook_embed")
    _, c_corr = model64.run_with_cache(corrupted, names_filter="hook_embed")
    for alpha in (1 / 3, 2 / 3, 1.0):
        between = c_corr["hook_embed"] + alpha * (c_clean["hook_embed"] - c_corr["hook_embed"])
        with model64.hooks([("hook_embed", lambda act, hook: between)]):
            _, cache = model64.run_with_cache(corrupted, names_filter=E._is_gradient_hook, incl_bwd=True, metric=metric)
        rows = np.concatenate([g.reshape(len(g), -1).copy() for g in E._input_gradients(model64, cache)])
        by_step += rows @ change.T / 3
    inputs = {(c, x): i for i, (c, x, _) in enumerate(E._inputs(model64.cfg))}
    expected = [by_step[inputs[(r.downstream, r.input)], names.index(r.upstream)] for r in a.itertuples()]
    np.testing.assert_allclose(a["score"], expected, rtol=0, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_processed_weights_give_the_same_scores(tiny_dir, model64, pair, method):
    # folding the layer norms and centring the writing weights change no function the scores are
    # made of (the input gradients, taken back through a layer norm, have no mean for centring to
    # remove): the scores agree, through a first layer norm with no gain or bias of its own
    clean, corrupted, metric = pair
    processed = npgpt2.from_pretrained(tiny_dir, dtype="float64", fold_ln=True, center_writing_weights=True,
                                       fold_value_biases=True)
    assert processed.weights.blocks[0].ln1_b is None
    key = ["upstream", "downstream", "input"]
    a, b = (E.edge_attribution(m, clean, corrupted, metric, method=method, ig_steps=2).sort_values(key)
            .reset_index(drop=True) for m in (processed, model64))
    assert (a[key] == b[key]).all().all()
    np.testing.assert_allclose(a["score"], b["score"], rtol=0, atol=1e-12 * np.abs(b["score"]).max())


def test_prompts_of_unequal_length_are_refused_not_padded(model):
    """Padding would be read as tokens (no attention mask is taken): the metric at position -1 of
    the shorter prompt would read a padding token."""
    metric = metrics.logit_diff(" Mary", " John")
    clean = ["When Mary and John went to the store, John gave a drink to", "Mary gave John a drink"]
    corrupted = ["When Alice and Bob went to the store, Carl gave a drink to", "Alice gave Bob a drink"]
    with pytest.raises(npgpt2.InputError, match=r"the clean prompts have different numbers of tokens \(5, 14\)"):
        E.edge_attribution(model, clean, corrupted, metric)


def test_faithfulness_of_identical_runs_is_refused(model64, pair):
    clean, _, metric = pair
    with pytest.raises(ValueError, match="the clean and corrupted runs give the same metric"):
        E.circuit_faithfulness(model64, clean, clean, [], metric)


def test_circuit_command_refuses_identical_prompts_before_the_work(tiny_dir, capsys, monkeypatch):
    from npgpt2 import cli

    monkeypatch.setattr(E, "edge_attribution", lambda *a, **k: pytest.fail("scored edges of identical prompts"))
    text = "When Mary and John went to the store, John gave a drink to"
    assert cli.main(["circuit", text, text, "-m", tiny_dir, "--answer", " Mary", "--wrong", " John"]) == 2
    err = capsys.readouterr().err
    assert "the clean and corrupted prompts are the same tokens" in err and len(err.strip().splitlines()) == 1


def test_circuit_command_prints_no_negative_zero(tiny_dir, capsys, monkeypatch):
    from npgpt2 import cli

    monkeypatch.setattr(E, "circuit_faithfulness", lambda *a, **k: -1e-5)
    assert cli.main(["circuit", "When Mary and John went", "When Alice and Bob went", "-m", tiny_dir,
                     "--answer", " Mary", "--wrong", " John", "--method", "eap", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "-0.000" not in out and "restores the clean logit difference): 0.000" in out
