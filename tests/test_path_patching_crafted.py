"""Path patching (Wang et al., 2022) on a 3-layer model whose weights are written by hand, so that
what each patch may and may not change is known in advance.

The residual stream (d_model = 24) is cut into orthonormal directions u[k] = (e_2k - e_2k+1) / sqrt 2,
each with a mean of zero, and every component reads and writes named ones:

    embed   token sign into T (+-2), token identity into I (+-1.5), position into P and S
    L0H1    the sender: attends uniformly to all earlier positions, reads T, writes A
    L0H0, L0H2, L0H3   read I and P (L0H3 also T), write B
    mlp0    reads A (so it would see a leaking patch) and B, writes M0
    L1H2    the receiver: its value reads only A; its query and key read P, I and B (blind to A); writes C
    L1H0, L1H1, L1H3   read I, P, T, B, M0 (never A); write D
    mlp1    reads C and D, writes M1
    L2H0    reads C in its value, writes E;  L2H1-3 and mlp2 write F
    logits  token 0 reads A, E and F; token 1 reads A and C; the metric is logit[0] - logit[1]

Layer norm gains are equal on the two coordinates of each direction, and the biases of the layer
norms are zero. The corrupted prompt flips every token's sign (T) and keeps the rest: L0H1's
corrupted output is exactly minus its clean output, and since nothing else writes A, adding
(corrupted - clean) to a residual stream only flips its A part. The norm and mean of the stream are
then unchanged, so a layer norm passes the change on as the linear map u_A -> g_A u_A / scale, and a
reader blind to A sees exactly nothing. That makes the expectations closed-form; the references
below are in addition computed by a forward pass written out here in NumPy (``run_by_hand``), which
gives each downstream input its own copy of the residual stream, as the paper's path patching does.
"""

import numpy as np
import pytest
from by_hand import causal_scores, gelu_new, layer_norm, softmax

import npgpt2
from npgpt2 import metrics
from npgpt2.analysis import edges as E
from npgpt2.testing import write_checkpoint

D, N_HEAD, D_HEAD, N_LAYER, D_MLP, VOCAB, N_CTX = 24, 4, 6, 3, 8, 4, 8
EPS = 1e-5
U = np.zeros((D // 2, D))
for _k in range(D // 2):
    U[_k, 2 * _k], U[_k, 2 * _k + 1] = 2 ** -0.5, -(2 ** -0.5)
T, I, P, A, B, M0, C, DD, M1, EE, F, S = U  # the twelve directions, named as in the docstring
METRIC = metrics.logit_diff(0, 1)  # token ids; the batch mean at the last position


def _gain(values):
    """A layer norm gain equal on both coordinates of each direction: [D]."""
    return np.repeat(np.asarray(values, dtype=np.float64), 2)


def crafted_weights() -> dict:
    """The per-head weights of the model described above, in TransformerLens's shapes."""
    z = np.zeros
    w = {"W_E": z((VOCAB, D)), "W_pos": z((N_CTX, D)), "W_U": z((D, VOCAB)),
         "W_Q": z((N_LAYER, N_HEAD, D, D_HEAD)), "W_K": z((N_LAYER, N_HEAD, D, D_HEAD)),
         "W_V": z((N_LAYER, N_HEAD, D, D_HEAD)), "W_O": z((N_LAYER, N_HEAD, D_HEAD, D)),
         "b_Q": z((N_LAYER, N_HEAD, D_HEAD)), "b_K": z((N_LAYER, N_HEAD, D_HEAD)), "b_V": z((N_LAYER, N_HEAD, D_HEAD)),
         "b_O": z((N_LAYER, D)), "W_in": z((N_LAYER, D, D_MLP)), "b_in": z((N_LAYER, D_MLP)),
         "W_out": z((N_LAYER, D_MLP, D)), "b_out": z((N_LAYER, D)),
         "ln1_w": np.stack([_gain(1 + 0.05 * np.arange(12) * (l + 1)) for l in range(N_LAYER)]),
         "ln2_w": np.stack([_gain(1.2 - 0.03 * np.arange(12) * (l + 1)) for l in range(N_LAYER)]),
         "ln_final_w": _gain(0.9 + 0.04 * np.arange(12))}
    for tok in range(VOCAB):  # token = 2 * identity bit + sign bit
        w["W_E"][tok] = 2.0 * (-1) ** (tok % 2) * T + 1.5 * (-1) ** (tok // 2) * I
    for p in range(N_CTX):
        w["W_pos"][p] = (0.5 + 0.4 * p) * P + 0.3 * (-1) ** p * S
    Q, K, V, O = w["W_Q"], w["W_K"], w["W_V"], w["W_O"]

    # layer 0: L0H1 (q = k = 0: uniform attention) moves the sign into A; the others write B
    V[0, 1, :, 0], O[0, 1, 0] = T, 1.5 * A
    Q[0, 0, :, 0], K[0, 0, :, 0], V[0, 0, :, 0], O[0, 0, 0] = 2 * P, 2 * P, I, B
    Q[0, 2, :, 0], K[0, 2, :, 0], V[0, 2, :, 0], O[0, 2, 0] = 1.5 * I, 1.5 * I, P, 0.5 * B
    w["b_Q"][0, 3, 0], K[0, 3, :, 0], V[0, 3, :, 0], V[0, 3, :, 1], O[0, 3, 0], O[0, 3, 1] = 1.0, P, I, T, 0.7 * B, -0.4 * B
    w["b_O"][0] = 0.1 * S
    w["W_in"][0, :, 0], w["W_in"][0, :, 1], w["b_in"][0, :2] = A + 0.5 * I, B - A, (0.1, -0.2)
    w["W_out"][0, 0], w["W_out"][0, 1] = M0, 0.5 * M0

    # layer 1: L1H2 reads A in its value only; the other heads never read A
    Q[1, 2, :, 0], Q[1, 2, :, 1], K[1, 2, :, 0], K[1, 2, :, 1] = 1.5 * P, I + 2 * B, 1.5 * P, B - I
    w["b_Q"][1, 2, 0], w["b_V"][1, 2, 0] = 0.3, 0.2
    V[1, 2, :, 0], V[1, 2, :, 1], O[1, 2, 0], O[1, 2, 1] = A, 0.5 * A, C, 0.3 * C
    Q[1, 0, :, 0], K[1, 0, :, 0], V[1, 0, :, 0], V[1, 0, :, 1], O[1, 0, 0], O[1, 0, 1] = I, P, B, M0, DD, 0.5 * DD
    Q[1, 1, :, 0], K[1, 1, :, 0], V[1, 1, :, 0], O[1, 1, 0] = T, T, I, -0.8 * DD
    K[1, 3, :, 0], V[1, 3, :, 0], V[1, 3, :, 1], O[1, 3, 0], O[1, 3, 1] = P, M0, P, 0.6 * DD, 0.2 * DD
    w["b_K"][1, 3, 0] = 0.5
    w["W_in"][1, :, 0], w["W_in"][1, :, 1], w["b_in"][1, :2] = C + 0.5 * DD, I - C, (0.05, 0.1)
    w["W_out"][1, 0], w["W_out"][1, 1] = M1, -0.7 * M1

    # layer 2: L2H0 reads C (L1H2's output) in its value
    Q[2, 0, :, 0], K[2, 0, :, 0], V[2, 0, :, 0], O[2, 0, 0] = P, P, C, 1.2 * EE
    V[2, 1, :, 0], O[2, 1, 0] = DD, F
    Q[2, 2, :, 0], K[2, 2, :, 0], V[2, 2, :, 0], O[2, 2, 0] = I, I, M1, 0.5 * F
    V[2, 3, :, 0], V[2, 3, :, 1], O[2, 3, 0], O[2, 3, 1] = I, M1, 0.3 * F, -0.3 * F
    w["W_in"][2, :, 0], w["W_out"][2, 0] = EE, 0.4 * F

    w["W_U"][:, 0] = A + EE + 0.2 * F
    w["W_U"][:, 1] = -0.5 * A + 0.8 * C
    w["W_U"][:, 2], w["W_U"][:, 3] = I, P + M1
    return w


def hub_state_dict(w: dict) -> dict:
    """The same weights keyed and laid out as a Hugging Face GPT-2 checkpoint (float64)."""
    state = {"wte.weight": w["W_E"], "wpe.weight": w["W_pos"], "lm_head.weight": w["W_U"].T.copy(),
             "ln_f.weight": w["ln_final_w"], "ln_f.bias": np.zeros(D)}
    for l in range(N_LAYER):
        heads = [np.concatenate(list(w[name][l]), axis=1) for name in ("W_Q", "W_K", "W_V")]  # [D, D] each
        p = f"h.{l}."
        state.update({
            p + "ln_1.weight": w["ln1_w"][l], p + "ln_1.bias": np.zeros(D),
            p + "attn.c_attn.weight": np.concatenate(heads, axis=1),
            p + "attn.c_attn.bias": np.concatenate([w[b][l].reshape(-1) for b in ("b_Q", "b_K", "b_V")]),
            p + "attn.c_proj.weight": w["W_O"][l].reshape(D, D), p + "attn.c_proj.bias": w["b_O"][l],
            p + "ln_2.weight": w["ln2_w"][l], p + "ln_2.bias": np.zeros(D),
            p + "mlp.c_fc.weight": w["W_in"][l], p + "mlp.c_fc.bias": w["b_in"][l],
            p + "mlp.c_proj.weight": w["W_out"][l], p + "mlp.c_proj.bias": w["b_out"][l],
        })
    return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in state.items()}


def run_by_hand(w: dict, tokens, extra=None) -> dict:
    """GPT-2's forward pass in plain NumPy, with ``extra`` {(component, input): [batch, pos, D]}
    added to the residual stream that one input alone reads ("L1H2", "v"), ("mlp0", "mlp"),
    ("logits", "logits"). Returns every intermediate, keyed by name and layer."""
    extra = extra or {}
    tokens = np.asarray(tokens)
    x = w["W_E"][tokens] + w["W_pos"][:tokens.shape[1]]  # [batch, pos, D]
    out = {"embed": x}
    zero = np.zeros(D)
    for l in range(N_LAYER):
        out[f"resid_pre{l}"] = x
        results = []
        for h in range(N_HEAD):
            name = f"L{l}H{h}"
            q, k, v = (layer_norm(x + extra.get((name, s), 0), w["ln1_w"][l], zero, EPS) @ w["W_" + s.upper()][l, h]
                       + w["b_" + s.upper()][l, h] for s in "qkv")  # [batch, pos, D_HEAD] each
            pattern = softmax(causal_scores(q / np.sqrt(D_HEAD), k))  # [batch, query, key]
            out[name, "pattern"], out[name, "z"] = pattern, pattern @ v
            out[name] = out[name, "z"] @ w["W_O"][l, h]  # [batch, pos, D]: what the head writes
            results.append(out[name])
        x = x + sum(results) + w["b_O"][l]
        out[f"resid_mid{l}"] = x
        out[f"mlp{l}", "pre"] = (layer_norm(x + extra.get((f"mlp{l}", "mlp"), 0), w["ln2_w"][l], zero, EPS)
                                 @ w["W_in"][l] + w["b_in"][l])
        out[f"mlp{l}"] = gelu_new(out[f"mlp{l}", "pre"]) @ w["W_out"][l] + w["b_out"][l]
        x = x + out[f"mlp{l}"]
    out["resid_final"] = x
    out["logits"] = layer_norm(x + extra.get(("logits", "logits"), 0), w["ln_final_w"], zero, EPS) @ w["W_U"]
    return out


def metric_by_hand(logits) -> float:
    return float(np.mean(logits[:, -1, 0] - logits[:, -1, 1]))


def ln_scale(x):
    """A layer norm's divisor for a residual stream x [..., D]: [..., 1]."""
    centred = x - x.mean(-1, keepdims=True)
    return np.sqrt((centred ** 2).mean(-1, keepdims=True) + EPS)


# token = 2 * identity bit + sign bit; the corrupted prompt flips every sign bit and nothing else
CLEAN = np.array([[0, 2, 3, 0, 2, 1], [2, 2, 0, 1, 0, 3]])
CORRUPTED = CLEAN ^ 1


@pytest.fixture(scope="module")
def crafted_dir(tmp_path_factory):
    """The crafted weights as a checkpoint folder (float64 safetensors)."""
    cfg = npgpt2.GPT2Config(n_layer=N_LAYER, n_head=N_HEAD, n_embd=D, n_ctx=N_CTX, vocab_size=VOCAB, n_inner=D_MLP)
    return write_checkpoint(tmp_path_factory.mktemp("crafted"), cfg, hub_state_dict(crafted_weights()),
                            tokenizer_files=False)


@pytest.fixture(scope="module")
def crafted(crafted_dir):
    """(the loaded model, the weights, the hand forward pass of the clean and corrupted prompts)"""
    w = crafted_weights()
    model = npgpt2.from_pretrained(crafted_dir, dtype="float64")
    clean, corrupted = run_by_hand(w, CLEAN), run_by_hand(w, CORRUPTED)
    return model, w, clean, corrupted


RECORDED = ("attn.hook_pattern", "attn.hook_z", "attn.hook_result", "mlp.hook_pre", "hook_resid_pre", "hook_resid_mid")


def record(model, run):
    """Every pattern, z, head result, MLP pre-activation and residual stream of the forward passes
    ``run()`` makes (the last pass's), and what ``run()`` returned."""
    seen = {}
    names = [f"blocks.{l}.{n}" for l in range(N_LAYER) for n in RECORDED]
    hooks = [(n, lambda act, hook, n=n: seen.__setitem__(n, np.array(act, copy=True))) for n in names]
    with model.hooks(hooks):
        value = run()
    return seen, value


def test_the_crafted_model_is_the_model_described(crafted):
    """The checkpoint loads as the hand forward pass computes it; L0H1's corrupted output is minus
    its clean one and lies in A, which nothing else writes."""
    model, w, clean, corrupted = crafted
    seen, logits = record(model, lambda: model(CLEAN))
    np.testing.assert_allclose(logits, clean["logits"], atol=1e-12)
    for l in range(N_LAYER):
        np.testing.assert_allclose(seen[f"blocks.{l}.attn.hook_pattern"],
                                   np.stack([clean[f"L{l}H{h}", "pattern"] for h in range(N_HEAD)], 1), atol=1e-13)
        np.testing.assert_allclose(seen[f"blocks.{l}.attn.hook_result"],
                                   np.stack([clean[f"L{l}H{h}"] for h in range(N_HEAD)], 2), atol=1e-13)
        np.testing.assert_allclose(seen[f"blocks.{l}.mlp.hook_pre"], clean[f"mlp{l}", "pre"], atol=1e-13)
    assert METRIC(logits) == pytest.approx(metric_by_hand(clean["logits"]), abs=1e-12)

    sender = clean["L0H1"]
    np.testing.assert_allclose(corrupted["L0H1"], -sender, atol=1e-15)
    np.testing.assert_allclose(sender, (sender @ A)[..., None] * A, atol=1e-15)  # in A only
    assert np.abs(sender @ A).min() > 0.1
    for name in ("resid_pre1", "resid_pre2", "resid_final"):  # its A part is L0H1's, nothing else's
        np.testing.assert_allclose(clean[name] @ A, sender @ A, atol=1e-14)
    # the layer-0 heads blind to T write the same in both runs; L0H3 (reads T) does not
    for h in (0, 2):
        np.testing.assert_allclose(corrupted[f"L0H{h}"], clean[f"L0H{h}"], atol=1e-14)
    assert np.abs(corrupted["L0H3"] - clean["L0H3"]).max() > 0.1
    # the sender is not a bystander: the metric depends on it
    assert abs(metric_by_hand(clean["logits"]) - metric_by_hand(corrupted["logits"])) > 0.1


def test_into_the_value_of_one_head_changes_that_head_and_what_reads_it(crafted):
    model, w, clean, corrupted = crafted
    delta = corrupted["L0H1"] - clean["L0H1"]  # [batch, pos, D] = -2 x the sender's clean output
    plain, clean_value = record(model, lambda: METRIC(model(CLEAN)))
    seen, value = record(model, lambda: E.path_patch(model, CLEAN, CORRUPTED, METRIC, "L0H1", ("L1H2", "v")))

    # closed form: the receiver's value input is the clean stream with its A part flipped, whose norm
    # and mean are the clean ones, so its value moves by delta's A part through g_A / scale and W_V
    resid = clean["resid_pre1"]
    scale = ln_scale(resid)
    np.testing.assert_allclose(ln_scale(resid + delta), scale, rtol=1e-14)
    g_A = w["ln1_w"][1] @ np.abs(A) / np.abs(A).sum()
    v_clean = layer_norm(resid, w["ln1_w"][1], 0, EPS) @ w["W_V"][1, 2] + w["b_V"][1, 2]
    v_patched = v_clean + (g_A * (delta @ A) / scale[..., 0])[..., None] * (A @ w["W_V"][1, 2])
    z_closed_form = clean["L1H2", "pattern"] @ v_patched
    patched = run_by_hand(w, CLEAN, {("L1H2", "v"): delta})
    np.testing.assert_allclose(patched["L1H2", "z"], z_closed_form, atol=1e-13)  # the two references agree

    z = seen["blocks.1.attn.hook_z"]
    np.testing.assert_allclose(z[:, :, 2], z_closed_form, atol=1e-12)
    assert np.abs(z[:, :, 2] - plain["blocks.1.attn.hook_z"][:, :, 2]).max() > 0.1
    # up to the receiver's output nothing else moves: the other heads of layers 0 and 1, the patterns
    # of both layers, mlp0's input (mlp0 reads A: a leaking patch would show there), layer 1's stream
    for l in (0, 1):
        np.testing.assert_allclose(seen[f"blocks.{l}.attn.hook_pattern"], plain[f"blocks.{l}.attn.hook_pattern"], atol=1e-12)
    np.testing.assert_allclose(seen["blocks.0.attn.hook_z"], plain["blocks.0.attn.hook_z"], atol=1e-12)
    np.testing.assert_allclose(seen["blocks.1.attn.hook_z"][:, :, [0, 1, 3]], plain["blocks.1.attn.hook_z"][:, :, [0, 1, 3]],
                               atol=1e-12)
    for name in ("blocks.0.mlp.hook_pre", "blocks.0.hook_resid_mid", "blocks.1.hook_resid_pre"):
        np.testing.assert_allclose(seen[name], plain[name], atol=1e-12)

    # after the receiver, the change travels only through its output: layer 1's MLP reads the clean
    # stream plus the receiver's change, and layer 2's stream differs from the clean one in C (the
    # receiver's direction) and M1 (mlp1's, which reads C) alone, never in A
    change = patched["L1H2"] - clean["L1H2"]
    np.testing.assert_allclose(seen["blocks.1.hook_resid_mid"], clean["resid_mid1"] + change, atol=1e-12)
    np.testing.assert_allclose(seen["blocks.1.mlp.hook_pre"], patched["mlp1", "pre"], atol=1e-12)
    np.testing.assert_allclose(seen["blocks.1.mlp.hook_pre"],
                               layer_norm(clean["resid_mid1"] + change, w["ln2_w"][1], 0, EPS) @ w["W_in"][1] + w["b_in"][1],
                               atol=1e-12)
    moved = seen["blocks.2.hook_resid_pre"] - plain["blocks.2.hook_resid_pre"]
    np.testing.assert_allclose(moved @ C, change @ C, atol=1e-12)
    rest = moved - (moved @ C)[..., None] * C - (moved @ M1)[..., None] * M1
    np.testing.assert_allclose(rest, 0, atol=1e-12)
    np.testing.assert_allclose(seen["blocks.2.hook_resid_pre"] @ A, clean["resid_pre2"] @ A, atol=1e-12)
    assert np.abs(moved @ C).max() > 0.1
    for h in range(N_HEAD):  # layer 2 as the hand forward pass with the receiver's input patched
        np.testing.assert_allclose(seen["blocks.2.attn.hook_z"][:, :, h], patched[f"L2H{h}", "z"], atol=1e-12)
        np.testing.assert_allclose(seen["blocks.2.attn.hook_pattern"][:, h], patched[f"L2H{h}", "pattern"], atol=1e-12)
    assert np.abs(seen["blocks.2.attn.hook_z"][:, :, 0] - plain["blocks.2.attn.hook_z"][:, :, 0]).max() > 0.01

    assert value == pytest.approx(metric_by_hand(patched["logits"]), abs=1e-12)
    assert abs(value - clean_value) > 0.1


@pytest.mark.parametrize("blind", ["q", "k"])
def test_into_a_query_or_key_blind_to_the_sender_changes_nothing(crafted, blind):
    model, w, clean, corrupted = crafted
    plain, clean_value = record(model, lambda: METRIC(model(CLEAN)))
    seen, value = record(model, lambda: E.path_patch(model, CLEAN, CORRUPTED, METRIC, "L0H1", ("L1H2", blind)))
    assert value == pytest.approx(clean_value, abs=1e-12)
    for name in plain:
        np.testing.assert_allclose(seen[name], plain[name], atol=1e-12, err_msg=name)
    # the value input of the same head does move it; all three together are the value alone
    into_v = E.path_patch(model, CLEAN, CORRUPTED, METRIC, "L0H1", ("L1H2", "v"))
    assert abs(into_v - clean_value) > 0.1
    assert E.path_patch(model, CLEAN, CORRUPTED, METRIC, "L0H1", "L1H2") == pytest.approx(into_v, abs=1e-12)
    # a sender writing where this input looks (L0H3 writes B, which the query and key read) does move
    # it, by what the hand forward pass says: the input is patched, not skipped
    delta = corrupted["L0H3"] - clean["L0H3"]
    by_hand = metric_by_hand(run_by_hand(w, CLEAN, {("L1H2", blind): delta})["logits"])
    assert E.path_patch(model, CLEAN, CORRUPTED, METRIC, "L0H3", ("L1H2", blind)) == pytest.approx(by_hand, abs=1e-12)
    assert abs(by_hand - clean_value) > 1e-3


def test_into_the_logits_is_the_direct_effect(crafted):
    model, w, clean, corrupted = crafted
    delta = corrupted["L0H1"] - clean["L0H1"]
    plain, clean_value = record(model, lambda: METRIC(model(CLEAN)))
    seen, value = record(model, lambda: E.path_patch(model, CLEAN, CORRUPTED, METRIC, "L0H1", "logits"))
    # closed form: the final stream's A part flips, its layer norm's scale stays, and the logits move
    # by delta's A part through g_A / scale and W_U's A row
    final = clean["resid_final"][:, -1]  # [batch, D]
    scale = ln_scale(final)[:, 0]
    g_A = w["ln_final_w"] @ np.abs(A) / np.abs(A).sum()
    move = g_A * (delta[:, -1] @ A) / scale * (A @ (w["W_U"][:, 0] - w["W_U"][:, 1]))  # [batch]
    assert value == pytest.approx(clean_value + move.mean(), abs=1e-12)
    by_hand = metric_by_hand(layer_norm(clean["resid_final"] + delta, w["ln_final_w"], 0, EPS) @ w["W_U"])
    assert value == pytest.approx(by_hand, abs=1e-12)
    assert abs(move.mean()) > 0.1
    for name in plain:  # nothing inside the model moves
        np.testing.assert_allclose(seen[name], plain[name], atol=1e-12, err_msg=name)


def _reads_head(component: str, layer: int) -> bool:
    """Does ``component`` ("L2H0", "mlp1", "logits") read what a head of ``layer`` writes? A head
    reads earlier layers; an MLP also its own layer's heads; the logits everything."""
    if component == "logits":
        return True
    if component.startswith("mlp"):
        return int(component[3:]) >= layer
    return int(component[1:component.index("H")]) > layer


@pytest.mark.parametrize("receivers, inputs", [
    (("L1H2", "v"), [("L1H2", "v")]),
    ("L2H0", [("L2H0", "q"), ("L2H0", "k"), ("L2H0", "v")]),
    (["mlp1", ("L2H0", "q")], [("mlp1", "mlp"), ("L2H0", "q")]),
    ("logits", [("logits", "logits")]),
])
def test_sender_sweep_is_nan_exactly_where_no_edge_exists(crafted, receivers, inputs):
    model, w, clean, corrupted = crafted
    sweep = E.path_patch_heads(model, CLEAN, CORRUPTED, METRIC, receivers, progress=False)
    assert sweep.shape == (N_LAYER, N_HEAD)
    for l in range(N_LAYER):
        reached = [i for i in inputs if _reads_head(i[0], l)]
        assert np.isnan(sweep[l]).all() == (not reached) and np.isfinite(sweep[l]).all() == bool(reached), l
        for h in range(N_HEAD) if reached else ():
            delta = corrupted[f"L{l}H{h}"] - clean[f"L{l}H{h}"]
            by_hand = metric_by_hand(run_by_hand(w, CLEAN, {i: delta for i in reached})["logits"])
            assert sweep[l, h] == pytest.approx(by_hand, abs=1e-12), (l, h)
    assert sweep[0, 1] == E.path_patch(model, CLEAN, CORRUPTED, METRIC, "L0H1", receivers)
    if receivers == ("L1H2", "v"):  # only layer 0 reaches it; of those, only the sender moves what it reads
        assert np.isnan(sweep[1:]).all()
        clean_value = metric_by_hand(clean["logits"])
        assert sweep[0, 0] == pytest.approx(clean_value, abs=1e-12) and sweep[0, 2] == pytest.approx(clean_value, abs=1e-12)
        assert abs(sweep[0, 1] - clean_value) > 0.1


@pytest.mark.parametrize("processing", [dict(fold_ln=True, center_writing_weights=True, fold_value_biases=True),
                                        dict(refactor_factored_attn_matrices=True)])
def test_processed_weights_patch_the_same_paths(crafted, crafted_dir, processing):
    """Folding the layer norms' gains into the weights, centring what is written, moving the value
    biases into b_O or refactoring W_Q W_K^T and W_V W_O keeps every path's value."""
    model, w, clean, corrupted = crafted
    processed = npgpt2.from_pretrained(crafted_dir, dtype="float64", **processing)
    cases = [("L0H1", ("L1H2", "v")), ("L0H1", ("logits", "logits")), ("L0H3", ("L1H2", "q")), ("L1H2", ("mlp1", "mlp"))]
    for sender, receiver in cases:
        by_hand = metric_by_hand(run_by_hand(w, CLEAN, {receiver: corrupted[sender] - clean[sender]})["logits"])
        assert E.path_patch(processed, CLEAN, CORRUPTED, METRIC, sender, [receiver]) == pytest.approx(by_hand, abs=1e-12)
