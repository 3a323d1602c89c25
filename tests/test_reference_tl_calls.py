"""TransformerLens's everyday calls against TransformerLens's own functions (``pytest -m reference``;
skipped without transformer_lens): get_act_name over a grid of short forms, FactoredMatrix on the
same arrays, lm_cross_entropy_loss / get_corner, and test_prompt's printout (TransformerLens's
test_prompt run on the same logits)."""

import io
import itertools
import re
from contextlib import redirect_stdout

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tl_utils = pytest.importorskip("transformer_lens.utilities")
tl_fm = pytest.importorskip("transformer_lens.FactoredMatrix")

from npgpt2 import FactoredMatrix, utils  # noqa: E402
from npgpt2.hooks import hook_names  # noqa: E402

pytestmark = pytest.mark.reference

SHORT = ["embed", "pos_embed", "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "q", "k", "v",
         "z", "pattern", "attn", "attn_scores", "attn_logits", "scores", "result", "pre", "post", "mlp_pre",
         "mlp_post", "mlp_mid", "mid", "key", "query", "value", "scale", "normalized", "rot_q", "pre_linear", "foo"]
LAYER_TYPES = [None, "a", "m", "b", "block", "attn", "mlp", "attention", "ln1", "ln2", "ln_final"]


def test_get_act_name_matches_transformer_lens():
    """Where TransformerLens's name is a GPT-2 hook point, npgpt2 gives the same name; where it is
    not (TransformerLens would fail later, at the lookup), npgpt2 raises a KeyError now, except for
    its extensions: short names with underscores and a layer ('resid_pre5'), and
    ('scale', None, 'ln_final'); and npgpt2's alias 'scores' for 'attn_scores'."""
    real = set(hook_names(12))
    agreed = raised = extended = 0
    cases = [(n, l, t) for n, l, t in itertools.product(SHORT, [None, 0, 7, "3"], LAYER_TYPES)]
    cases += [(f"{n}{l}{t or ''}", None, None) for n, l, t in itertools.product(SHORT, [0, 11], [None, "ln1", "ln2", "a"])]
    cases += [(full, None, None) for full in sorted(real)[:40]]
    for name, layer, layer_type in cases:
        theirs = tl_utils.get_act_name(name, layer, layer_type)
        try:
            ours = utils.get_act_name(name, layer, layer_type)
        except KeyError:
            assert theirs not in real, (name, layer, layer_type, theirs)
            raised += 1
            continue
        if theirs in real:
            assert ours == theirs, (name, layer, layer_type)
            agreed += 1
        else:
            underscore_short_form = "_" in re.sub(r"\d.*", "", name) and re.search(r"\d", name)
            final_ln = layer is None and layer_type == "ln_final" and ours.startswith("ln_final.")
            scores = name.startswith("scores")  # npgpt2's older alias of attn_scores
            assert (underscore_short_form or final_ln or scores) and ours in real, (name, layer, layer_type, theirs, ours)
            extended += 1
    print(f"get_act_name: {agreed} agree, {raised} raise where TransformerLens names no hook point, {extended} extended")
    assert agreed > 250 and raised > 100 and extended > 0


@pytest.fixture
def pair():
    rng = np.random.default_rng(8)
    A, B = rng.normal(size=(2, 3, 9, 4)), rng.normal(size=(2, 3, 4, 9))
    return FactoredMatrix(A, B), tl_fm.FactoredMatrix(torch.from_numpy(A), torch.from_numpy(B))


def close(ours, theirs, atol=1e-9):
    theirs = theirs.AB if isinstance(theirs, tl_fm.FactoredMatrix) else theirs
    ours = ours.AB if isinstance(ours, FactoredMatrix) else ours
    np.testing.assert_allclose(ours, theirs.detach().numpy() if hasattr(theirs, "detach") else theirs, atol=atol)


def test_factored_matrix_matches_transformer_lens(pair):
    ours, theirs = pair
    assert ours.shape == tuple(theirs.shape) and (ours.ldim, ours.mdim, ours.rdim) == (theirs.ldim, theirs.mdim, theirs.rdim)
    close(ours.AB, theirs.AB)
    close(ours.BA, theirs.BA)
    close(ours.S, theirs.S)
    close(ours.norm(), theirs.norm())
    close(ours.get_corner(2), theirs.get_corner(2))
    close(np.sort_complex(ours.eigenvalues), np.sort_complex(theirs.eigenvalues.numpy()), atol=1e-8)
    # singular vectors: the same up to one sign per pair
    sign = np.sign((ours.U * theirs.U.numpy()).sum(-2))  # [..., mdim]
    close(ours.U * sign[..., None, :], theirs.U)
    close(ours.V * sign[..., None, :], theirs.V)
    with pytest.warns(DeprecationWarning):
        ours_vh = ours.Vh
    with pytest.warns(DeprecationWarning):
        close(ours_vh * sign[..., None, :], theirs.Vh)
    close(ours.collapse_r() * sign[..., None, :], theirs.collapse_r())
    close(ours.collapse_l() * sign[..., :, None], theirs.collapse_l())
    close(ours.make_even(), theirs.make_even())
    for idx in [(1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), (0, 1, -1), (0, 1, -1, -1), (slice(None), 1)]:
        close(ours[idx], theirs[idx])
    assert ours.unsqueeze(1).shape == tuple(theirs.unsqueeze(1).shape)
    close(ours.T, theirs.T)
    x = np.random.default_rng(1).normal(size=(5, 9))
    close(x @ ours, torch.from_numpy(x) @ theirs)
    close(ours @ x.T, theirs @ torch.from_numpy(x.T))
    close(x[0] @ ours, torch.from_numpy(x[0]) @ theirs)
    close(ours @ x[0], theirs @ torch.from_numpy(x[0]))
    close(ours * 2.5, theirs * 2.5)
    close(2.5 * ours, 2.5 * theirs)
    close(ours @ ours.T, theirs @ theirs.T, atol=1e-8)


def test_lm_cross_entropy_loss_and_get_corner_match_transformer_lens():
    rng = np.random.default_rng(2)
    logits, tokens = rng.normal(size=(3, 7, 50)), rng.integers(0, 50, (3, 7))
    mask = np.array([[1] * 7, [1] * 5 + [0] * 2, [0, 0, 1, 1, 1, 1, 1]])
    t_logits, t_tokens, t_mask = map(torch.from_numpy, (logits, tokens, mask))
    for m, tm in ((None, None), (mask, t_mask)):
        for per_token in (False, True):
            ours = utils.lm_cross_entropy_loss(logits, tokens, m, per_token=per_token)
            theirs = tl_utils.lm_cross_entropy_loss(t_logits, t_tokens, tm, per_token=per_token)
            np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(utils.get_corner(logits, 2), tl_utils.get_corner(t_logits, 2).numpy())
    np.testing.assert_array_equal(utils.to_numpy(t_logits), logits)


class _TorchFacade:
    """npgpt2's model seen through torch tensors: what TransformerLens's test_prompt calls."""

    def __init__(self, model):
        self.model = model

    def to_tokens(self, text, prepend_bos=None):
        return torch.from_numpy(self.model.to_tokens(text, prepend_bos=bool(prepend_bos)))

    def to_str_tokens(self, text, prepend_bos=None):
        return self.model.to_str_tokens(text, prepend_bos=bool(prepend_bos))

    def to_string(self, token):
        return self.model.to_string(int(token))

    def __call__(self, tokens):
        return torch.from_numpy(self.model(tokens.numpy()).astype(np.float64))


@pytest.mark.parametrize("answer", ["mat", ["mat", "dog", " hat"]])
def test_test_prompt_prints_what_transformer_lens_prints(model64, answer):
    runs = []
    for fn, model in ((utils.test_prompt, model64), (tl_utils.test_prompt, _TorchFacade(model64))):
        out = io.StringIO()
        with redirect_stdout(out):
            fn("The cat sat on the", answer, model, prepend_bos=True, top_k=4)
        runs.append(out.getvalue())
    ours, theirs = runs
    if "Rank:" not in theirs and "Ranks of" not in theirs:  # rich printed somewhere else
        pytest.skip("TransformerLens's rich output was not captured")
    assert [line.rstrip() for line in ours.splitlines()] == [line.rstrip() for line in theirs.splitlines()]
