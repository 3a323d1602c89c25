"""``refactor_factored_attn_matrices`` against TransformerLens's (``pytest -m reference``).

The same synthetic weights loaded by npgpt2 and by TransformerLens 4 (TransformerBridge in
compatibility mode), both refactoring the attention matrices, alone and after fold_ln +
center_writing_weights + center_unembed (+ fold_value_biases, TransformerLens's default). Compared:
the logits; the products W_Q W_K^T and W_V W_O (which fix what a head does); b_V and b_O; and the
factors themselves through what the refactoring fixes of them: the Gram matrices
[W_Q; b_Q][W_Q; b_Q]^T, the same for K, W_V W_V^T and W_O^T W_O. (A singular vector's sign is
arbitrary, and where two singular values nearly coincide, 1.8348 and 1.8335 in one head here,
TransformerLens's SVD, which runs at float32 precision even on a float64 model, turns the pair
within its plane by ~3e-4; the Gram matrices do not see either.) Then npgpt2's own factors have
the structure the refactoring promises: W_O has orthonormal rows, [W_Q; b_Q] and [W_K; b_K] have
orthogonal columns of equal norms, W_V orthogonal columns. Tolerance: 1e-4 absolute (float32).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tl_bridge = pytest.importorskip("transformer_lens.model_bridge")

import npgpt2  # noqa: E402
from test_reference_transformer_lens import CFG, TOL, folder  # noqa: E402,F401  (the same weights: a fixture)

pytestmark = pytest.mark.reference


@pytest.mark.parametrize("processed", [False, True], ids=["refactor only", "fold_ln+center+fold_value_biases"])
def test_refactored_attention_matrices_match_transformer_lens(folder, processed):
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    tok = transformers.GPT2TokenizerFast.from_pretrained(folder)
    bridge = tl_bridge.TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok, dtype=torch.float32)
    options = dict(fold_ln=processed, center_writing_weights=processed, center_unembed=processed,
                   fold_value_biases=processed)
    bridge.enable_compatibility_mode(disable_warnings=True, refactor_factored_attn_matrices=True, **options)
    model = npgpt2.from_pretrained(folder, refactor_factored_attn_matrices=True, **options)
    assert model.processing["refactor_factored_attn_matrices"]
    plain = npgpt2.from_pretrained(folder, dtype="float64")
    tokens = np.random.default_rng(5).integers(0, CFG.d_vocab, (2, 11))
    with torch.no_grad():
        tl_logits = bridge(torch.from_numpy(tokens)).numpy()
    logits = model(tokens)

    def tl(name):
        return getattr(bridge, name).detach().numpy()

    def eff(W, b):  # [layer, head, d_model + 1, d_head]: the bias as one more input row
        return np.concatenate([W, b[:, :, None, :]], axis=2)

    def gram(A):  # A A^T over the last axis
        return A @ A.swapaxes(-1, -2)

    ours = {n: getattr(model, n).astype(np.float64) for n in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")}
    theirs = {n: tl(n).astype(np.float64) for n in ours}
    worst = {"logits": float(np.abs(logits - tl_logits).max()),
             "b_V": float(np.abs(ours["b_V"] - theirs["b_V"]).max()),
             "b_O": float(np.abs(ours["b_O"] - theirs["b_O"]).max())}
    for label, f in {
        "W_Q W_K^T": lambda w: w["W_Q"] @ w["W_K"].swapaxes(-1, -2),
        "W_V W_O": lambda w: w["W_V"] @ w["W_O"],
        "gram [W_Q; b_Q]": lambda w: gram(eff(w["W_Q"], w["b_Q"])),
        "gram [W_K; b_K]": lambda w: gram(eff(w["W_K"], w["b_K"])),
        "gram W_V": lambda w: gram(w["W_V"]),
        "gram W_O^T": lambda w: gram(w["W_O"].swapaxes(-1, -2)),
    }.items():
        worst[label] = float(np.abs(f(ours) - f(theirs)).max())
    print("\n" + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    assert not {k: v for k, v in worst.items() if not v <= TOL}, worst

    # the structure the refactoring promises, in npgpt2's own factors
    eye = np.eye(CFG.d_head)
    np.testing.assert_allclose(ours["W_O"] @ ours["W_O"].swapaxes(-1, -2), np.broadcast_to(eye, (3, 4) + eye.shape), atol=1e-5)
    Q, K = eff(ours["W_Q"], ours["b_Q"]), eff(ours["W_K"], ours["b_K"])
    QtQ, KtK, VtV = Q.swapaxes(-1, -2) @ Q, K.swapaxes(-1, -2) @ K, ours["W_V"].swapaxes(-1, -2) @ ours["W_V"]
    for M in (QtQ, VtV):  # orthogonal columns
        np.testing.assert_allclose(M * (1 - eye), 0, atol=1e-4)
    np.testing.assert_allclose(np.diagonal(QtQ, axis1=-2, axis2=-1), np.diagonal(KtK, axis1=-2, axis2=-1), rtol=1e-4)
    assert np.abs(np.abs(model.W_O) - np.abs(plain.W_O)).max() > 1e-2  # the weights did change
    # and the predictions did not
    log_probs = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    plain_logits = plain(tokens)
    plain_log_probs = plain_logits - np.log(np.exp(plain_logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(log_probs, plain_log_probs, atol=1e-4)
