"""Sparse autoencoders: the maps, hand-written gradients, loading SAELens's format from the hub
layout, splicing into the model, feature tables, training with resampling."""

import json
import os

import numpy as np
import pytest

import npgpt2
from npgpt2.sae import SAE, SAEError, active_latents, ce_loss_recovered, latent_logit_effect, run_with_sae, top_activating
from npgpt2.training.sae import activation_batches, init_sae, resample_dead, sae_loss_and_grads, train_sae
from npgpt2.testing import add_to_hub_cache
from conftest import TINY

D = TINY.d_model


def random_sae(d_in=D, d_sae=96, seed=0, hook="blocks.1.hook_resid_pre", dtype=np.float64):
    p = init_sae(d_in, d_sae, seed, dtype)
    rng = np.random.default_rng(seed)
    p["b_enc"] = (rng.standard_normal(d_sae) * 0.1 - 0.05).astype(dtype)
    p["b_dec"] = (rng.standard_normal(d_in) * 0.1).astype(dtype)
    return SAE(**p, hook_name=hook)


def identity_sae(d_in=D, hook="blocks.1.hook_resid_pre"):
    """Latents relu(x_i) and relu(-x_i): the reconstruction is exactly x."""
    eye = np.eye(d_in)
    return SAE(W_enc=np.concatenate([eye, -eye], 1), b_enc=np.zeros(2 * d_in),
               W_dec=np.concatenate([eye, -eye], 0), b_dec=np.zeros(d_in), hook_name=hook)


def test_encode_decode_formulas():
    sae = random_sae()
    x = np.random.default_rng(1).standard_normal((3, 5, D))
    f = sae.encode(x)
    np.testing.assert_allclose(f, np.maximum((x - sae.b_dec) @ sae.W_enc + sae.b_enc, 0))
    np.testing.assert_allclose(sae(x), f @ sae.W_dec + sae.b_dec)
    m = sae.metrics(x)
    flat = x.reshape(-1, D)
    err = sae(flat) - flat
    assert m["mse"] == pytest.approx((err ** 2).sum(1).mean())
    assert m["fve"] == pytest.approx(1 - (err ** 2).sum() / ((flat - flat.mean(0)) ** 2).sum())
    assert m["l0"] == pytest.approx((sae.encode(flat) > 0).sum(1).mean())
    assert m["dead_latents"] == int(((sae.encode(flat) > 0).sum(0) == 0).sum())
    assert identity_sae().metrics(x)["fve"] == pytest.approx(1.0)
    with pytest.raises(SAEError, match="activations of width 7 given to an SAE with d_in=64"):
        sae.encode(np.zeros((2, 7)))
    with pytest.raises(SAEError, match=r"W_dec has shape \[3, 64\]; expected \[96, 64\]"):
        SAE(W_enc=sae.W_enc, b_enc=sae.b_enc, W_dec=sae.W_dec[:3], b_dec=sae.b_dec)


def test_gradients_match_finite_differences():
    rng = np.random.default_rng(0)
    sae = random_sae(d_in=6, d_sae=10, seed=3)
    params = {k: getattr(sae, k).copy() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    x = rng.standard_normal((16, 6))
    l1 = 0.05
    _, _, grads = sae_loss_and_grads(params, x, l1)
    eps = 1e-6
    for name, g in grads.items():
        for _ in range(6):
            idx = tuple(rng.integers(0, n) for n in g.shape)
            up, down = ({k: v.copy() for k, v in params.items()} for _ in range(2))
            up[name][idx] += eps
            down[name][idx] -= eps
            numeric = (sae_loss_and_grads(up, x, l1)[0] - sae_loss_and_grads(down, x, l1)[0]) / (2 * eps)
            assert g[idx] == pytest.approx(numeric, rel=1e-5, abs=1e-8), (name, idx)


def write_sae_folder(folder, sae, cfg_extra=None):
    cfg = {"d_in": sae.d_in, "d_sae": sae.d_sae, "hook_point": sae.hook_name, "model_name": "gpt2-small",
           "prepend_bos": True, **(cfg_extra or {})}
    sae.save(folder)
    with open(os.path.join(folder, "cfg.json"), "w") as f:
        json.dump(cfg, f)
    return folder


def test_from_pretrained_release_hub_id_and_folder(tmp_path, hf_home):
    sae = random_sae(dtype=np.float32)
    repo = tmp_path / "repo"
    write_sae_folder(str(repo / "blocks.1.hook_resid_pre"), sae)
    # the release's hub repository, filed in the offline hub cache
    add_to_hub_cache(os.path.join(hf_home, "hub"), "jbloom/GPT2-Small-SAEs-Reformatted", repo)
    for loaded in (npgpt2.SAE.from_pretrained("gpt2-small-res-jb", "blocks.1.hook_resid_pre"),
                   npgpt2.SAE.from_pretrained("jbloom/GPT2-Small-SAEs-Reformatted", "blocks.1.hook_resid_pre"),
                   npgpt2.SAE.from_pretrained(str(repo), "blocks.1.hook_resid_pre")):
        np.testing.assert_array_equal(loaded.W_enc, sae.W_enc)
        np.testing.assert_array_equal(loaded.b_dec, sae.b_dec)
        assert loaded.hook_name == "blocks.1.hook_resid_pre" and loaded.cfg["prepend_bos"] is True
    assert npgpt2.SAE.from_pretrained("gpt2-small-res-jb", "blocks.1.hook_resid_pre").cfg["model_processing"] == {
        "center_writing_weights": True}
    with pytest.raises(SAEError, match="has no SAE 'blocks.1.hook_mlp_out'"):
        npgpt2.SAE.from_pretrained("gpt2-small-res-jb", "blocks.1.hook_resid_pre".replace("resid_pre", "mlp_out"))
    with pytest.raises(SAEError, match="not in the local Hugging Face cache"):
        npgpt2.SAE.from_pretrained("gpt2-small-res-jb", "blocks.5.hook_resid_pre")


def test_splicing_checks_processing_and_recovers_loss(tiny_dir):
    sae = identity_sae()
    sae.cfg["model_processing"] = {"center_writing_weights": True}
    plain = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    with pytest.raises(SAEError, match=r"center_writing_weights=True.*process_weights\(center_writing_weights=True\)"):
        run_with_sae(plain, sae, "Hello, my dog is cute")
    model = npgpt2.from_pretrained(tiny_dir, dtype="float64", center_writing_weights=True)
    tokens = model.to_tokens(["Hello, my dog is cute", "The quick brown fox"], prepend_bos=True)[:, :5]
    np.testing.assert_allclose(run_with_sae(model, sae, tokens), model(tokens), atol=1e-10)
    df = ce_loss_recovered(model, sae, tokens)
    assert df.loc[0, "sae_loss"] == pytest.approx(df.loc[0, "clean_loss"], abs=1e-10)
    assert df.loc[0, "ce_loss_recovered"] == pytest.approx(1.0)
    zero = model.run_with_hooks(tokens, fwd_hooks=[(sae.hook_name, lambda a, h: a * 0)], return_type="loss")
    assert df.loc[0, "zero_ablation_loss"] == pytest.approx(zero)
    noisy = random_sae(seed=4)
    noisy.cfg["model_processing"] = {"center_writing_weights": True}
    r = ce_loss_recovered(model, noisy, tokens).loc[0]
    assert r["ce_loss_recovered"] == pytest.approx((r.zero_ablation_loss - r.sae_loss) / (r.zero_ablation_loss - r.clean_loss))
    with pytest.raises(SAEError, match="'blocks.9.hook_resid_pre', which is not a hook point"):
        run_with_sae(model, identity_sae(hook="blocks.9.hook_resid_pre"), tokens)


def test_feature_tables(model64):
    sae = identity_sae()
    texts = ["The cat sat on the mat", "Hello, my dog is cute", "I am not sure what you are saying", "Oh no"]
    top = top_activating(model64, sae, texts, latent=7, k=4, context=2, batch_size=3)
    # latent 7 is relu(x[7]) of the residual stream entering block 1: check against the cache
    best = []
    for i, t in enumerate(texts):
        _, c = model64.run_with_cache(t, names_filter=sae.hook_name)
        x = c[sae.hook_name][0, :, 7]
        best += [(float(v), i, p) for p, v in enumerate(x) if v > 0]
    best.sort(reverse=True)
    assert [(r.text, r.position) for r in top.itertuples()] == [(i, p) for _, i, p in best[:4]]
    np.testing.assert_allclose(top["activation"], [v for v, _, _ in best[:4]])
    assert all("[[" in c and "]]" in c for c in top["context"])
    act = active_latents(model64, sae, "Hello, my dog is cute", k=3)
    assert set(act.columns) == {"position", "token", "rank", "latent", "activation"}
    assert (act.groupby("position").size() <= 3).all() and (act["activation"] > 0).all()
    eff = latent_logit_effect(model64, sae, latent=3, k=5)
    direction = sae.W_dec[3] * model64.weights.ln_final_w
    expected = np.sort(direction @ model64.W_U)[::-1][:5]
    np.testing.assert_allclose(eff[eff.direction == "promoted"]["logit_effect"], expected)
    with pytest.raises(SAEError, match="latent 500 is out of range"):
        latent_logit_effect(model64, sae, 500)


def test_activation_stream_is_bounded_and_complete(model):
    texts = [f"text number {i} says hello to the world" for i in range(23)]
    expected_rows = sum(len(model.to_tokens(t, prepend_bos=True)[0]) for t in texts)
    batches = list(activation_batches(model, texts, "blocks.0.hook_resid_post", batch_size=32,
                                      buffer_size=96, texts_per_run=4))
    assert sum(len(b) for b in batches) == expected_rows
    assert all(b.shape[1] == D for b in batches) and all(len(b) == 32 for b in batches[:-1])


def test_training_on_model_activations_reduces_loss(model):
    texts = ["the cat sat on the mat and looked at the dog"] * 40
    stream = activation_batches(model, texts, "blocks.1.hook_resid_pre", batch_size=64, buffer_size=256)
    sae, log = train_sae(stream, d_sae=128, l1_coeff=1e-3, lr=3e-3, progress=False, log_every=5,
                         hook_name="blocks.1.hook_resid_pre")
    assert sae.hook_name == "blocks.1.hook_resid_pre" and sae.W_dec.shape == (128, D)
    assert log["loss"].iloc[-1] < log["loss"].iloc[0]
    np.testing.assert_allclose(np.linalg.norm(sae.W_dec, axis=1), 1, atol=1e-5)  # unit-norm decoder
    assert list(log.columns) == ["step", "loss", "mse", "l1", "l0", "fve", "dead_latents", "resampled"]


def test_resampling_revives_dead_latents():
    from npgpt2.training.optim import Adam

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8))
    params = init_sae(8, 12, 0, np.float64)
    params["b_enc"][:5] = -100  # five latents that can never fire
    dead = (np.maximum(x @ params["W_enc"] + params["b_enc"], 0) > 0).sum(0) == 0
    assert dead[:5].all()
    _, parts, _ = sae_loss_and_grads(params, x, 1e-3)
    n = resample_dead(params, Adam(), dead, x, parts["err"], rng)
    assert n == dead.sum()
    alive_after = (np.maximum((x - params["b_dec"]) @ params["W_enc"] + params["b_enc"], 0) > 0).sum(0) > 0
    assert alive_after[:5].all()
    np.testing.assert_allclose(np.linalg.norm(params["W_dec"], axis=1), 1)
