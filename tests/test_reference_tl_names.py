"""The TransformerLens names a port reaches for, against TransformerLens 4 itself on the same weights
(``pytest -m reference``; skipped without transformer_lens): ``loss_per_token``, the parameters by
TransformerLens's names (``state_dict`` / ``tl_parameters``) and loading them back, and the config
fields. The bridge runs over Hugging Face's GPT2LMHeadModel, unprocessed and in compatibility mode
(npgpt2 processed with the same options)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tl_bridge = pytest.importorskip("transformer_lens.model_bridge")

import npgpt2  # noqa: E402
from npgpt2.testing import random_state_dict, write_checkpoint  # noqa: E402

pytestmark = pytest.mark.reference
CFG = npgpt2.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=64)
PROCESSING = dict(fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tl-names"), CFG, random_state_dict(CFG, seed=8))


def pair(folder, processed: bool):
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    tok = transformers.GPT2TokenizerFast.from_pretrained(folder)
    bridge = tl_bridge.TransformerBridge.boot_transformers(folder, hf_model=hf, tokenizer=tok, dtype=torch.float32)
    if processed:
        bridge.enable_compatibility_mode(disable_warnings=True, **PROCESSING)
    return bridge, npgpt2.from_pretrained(folder, **(PROCESSING if processed else {}))


@pytest.mark.parametrize("processed", [False, True], ids=["unprocessed", "processed"])
def test_loss_per_token_and_parameters_match_transformer_lens(folder, processed):
    bridge, model = pair(folder, processed)
    tokens = np.random.default_rng(3).integers(0, CFG.d_vocab, (2, 9))
    with torch.no_grad():
        theirs = bridge(torch.from_numpy(tokens), return_type="loss", loss_per_token=True).numpy()
    ours = model(tokens, return_type="loss", loss_per_token=True)
    assert ours.shape == theirs.shape == (2, 8)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert model(tokens, return_type="loss") == pytest.approx(float(theirs.mean()), rel=1e-5)

    tl_params = {k: v.detach().numpy() for k, v in bridge.tl_parameters().items()}
    params = model.state_dict()
    assert list(params) == list(tl_params)  # the same names, in the same order
    for name, theirs in tl_params.items():
        np.testing.assert_allclose(params[name], theirs, rtol=1e-5, atol=2e-6, err_msg=name)
    assert list(model.tl_parameters()) == list(params)


def test_config_fields_match_transformer_lens(folder):
    bridge, model = pair(folder, processed=False)
    for name in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx", "act_fn",
                 "normalization_type", "positional_embedding_type", "attn_only", "parallel_attn_mlp", "gated_mlp",
                 "final_rms", "n_key_value_heads", "attention_dir", "use_attn_result", "use_split_qkv_input",
                 "use_attn_in", "use_hook_mlp_in", "use_hook_tokens", "device"):
        assert getattr(model.cfg, name) == getattr(bridge.cfg, name), name
