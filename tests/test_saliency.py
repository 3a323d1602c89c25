"""Saliency over prompt tokens: gradient x input checked by finite differences, integrated
gradients by completeness."""

import numpy as np
import pytest

from npgpt2 import metrics
from npgpt2.analysis import token_saliency

PROMPT = "When Mary and John went to the store, John gave a drink to"


def test_gradient_x_input_is_the_directional_derivative_along_each_embedding(model64):
    metric = metrics.logit_diff(" Mary", " John")
    df = token_saliency(model64, PROMPT, metric, method="grad_x_input")
    tokens = model64.to_tokens(PROMPT)
    x = model64.W_E[tokens[0]]
    assert list(df["token"]) == model64.to_str_tokens(tokens)
    for i in (0, 3, len(df) - 1):
        def f(eps):
            def scale(act, hook):
                out = act.copy()
                out[0, i] += eps * x[i]  # move token i's embedding along itself
                return out
            return metric(model64.run_with_hooks(tokens, fwd_hooks=[("hook_embed", scale)]))

        fd = (f(1e-6) - f(-1e-6)) / 2e-6
        assert df["score"][i] == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert df["share"].sum() == pytest.approx(1.0)
    assert df.attrs["metric"] == pytest.approx(metric(model64(tokens)))


@pytest.mark.parametrize("baseline", ["zero", "eot"])
def test_integrated_gradients_add_up_to_the_change_in_the_metric(model64, baseline):
    df = token_saliency(model64, PROMPT, method="integrated_gradients", steps=64, baseline=baseline)
    change = df.attrs["metric"] - df.attrs["baseline_metric"]
    assert abs(change) > 0.5  # a change worth explaining
    assert abs(df["score"].sum() - change) <= 0.01 * abs(change)
    assert df.attrs["completeness_error"] <= 0.01
    # the baseline's value is the metric of the model run on the baseline embeddings
    tokens = model64.to_tokens(PROMPT)
    top = int(model64(tokens)[0, -1].argmax())
    eot = model64.W_E[50256]
    base = np.zeros((1,) + tokens.shape + (64,))[0] if baseline == "zero" else np.broadcast_to(eot, tokens.shape + (64,))
    logits = model64.run_with_hooks(tokens, fwd_hooks=[("hook_embed", lambda a, h: np.array(base))])
    assert df.attrs["baseline_metric"] == pytest.approx(metrics.logprob(top)(logits), abs=1e-10)


def test_one_step_integrated_gradients_is_the_gradient_at_the_midpoint(model64):
    metric = metrics.logprob(" the")
    tokens = model64.to_tokens(PROMPT)
    x = model64.W_E[tokens[0]]
    with pytest.warns(UserWarning, match="take more steps"):  # one step is far from complete
        df = token_saliency(model64, PROMPT, metric, method="integrated_gradients", steps=1)
    with model64.hooks([("hook_embed", lambda a, h: a * 0.5)]):  # the midpoint between 0 and x
        _, cache = model64.run_with_cache(tokens, names_filter="hook_embed", incl_bwd=True, metric=metric)
    np.testing.assert_allclose(df["score"], (x * cache["hook_embed_grad"][0]).sum(-1), rtol=1e-10, atol=1e-12)


def test_bad_arguments_are_named(model):
    with pytest.raises(ValueError, match="method='saliency'"):
        token_saliency(model, PROMPT, method="saliency")
    with pytest.raises(ValueError, match="baseline='mean'"):
        token_saliency(model, PROMPT, method="integrated_gradients", baseline="mean")
    with pytest.raises(ValueError, match="steps=0"):
        token_saliency(model, PROMPT, method="integrated_gradients", steps=0)
    with pytest.raises(ValueError, match="one prompt"):
        token_saliency(model, ["a b", "c d"])


def test_trace_grad_prints_each_hook_points_gradient_norm(tiny_dir, model, capsys):
    from npgpt2 import cli

    assert cli.main(["trace", "The dog sat", "-m", tiny_dir, "--grad", "--target", " on",
                     "--names", "*resid_pre"]) == 0
    out = capsys.readouterr().out
    tokens = model.to_tokens("The dog sat")
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_pre"), incl_bwd=True,
                                    metric=metrics.logprob(" on"))
    for l in range(2):
        row = next(line for line in out.splitlines() if line.startswith(f"blocks.{l}.hook_resid_pre"))
        assert float(row.split()[-1]) == pytest.approx(np.linalg.norm(cache[f"blocks.{l}.hook_resid_pre_grad"]),
                                                       rel=1e-3)
    assert "log P(' on')" in out
    assert cli.main(["trace", "The dog", "-m", tiny_dir, "--target", " on"]) == 2  # --target needs --grad


def test_saliency_command_prints_the_table(tiny_dir, model, capsys, tmp_path):
    from npgpt2 import cli

    png = tmp_path / "saliency.png"
    assert cli.main(["saliency", PROMPT, "-m", tiny_dir, "--target", " Mary", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    df = token_saliency(model, PROMPT, metrics.logprob(" Mary"), method="integrated_gradients", steps=64)
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    assert len(rows) == len(df)
    np.testing.assert_allclose([float(r[-2]) for r in rows], df["score"], atol=1e-4)
    assert "completeness error" in out and png.stat().st_size > 1000
