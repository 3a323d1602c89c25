"""Training GPT-2 in NumPy: AdamW, clipping, accumulation, schedules, data, save_pretrained, perplexity,
and a tiny model trained from scratch. (Step-by-step equality with torch: test_reference_training.py.)"""

import json
import math
import os

import numpy as np
import pytest
from safetensors import safe_open

import npgpt2
from npgpt2 import training
from npgpt2.config import GPT2Config
from npgpt2.save import hub_state_dict
from npgpt2.tokenizer import ENDOFTEXT_ID
from npgpt2.training.optim import Adam
from npgpt2.weights import weights_from_state_dict


def fresh(tiny_dir, dtype="float64"):
    return npgpt2.from_pretrained(tiny_dir, dtype=dtype)


def random_batches(n, batch=2, seq=12, seed=0):
    data = training.TokenDataset(np.random.default_rng(seed).integers(0, 50257, 500))
    return [data.batch(i, batch, seq, seed=seed) for i in range(n)]


def params_of(model):
    return {k: np.array(v) for k, v in training.named_parameters(model.weights)}


# ------------------------------------------------------------------------------------- AdamW
def test_adamw_owns_writable_weights_that_the_forward_uses(tiny_dir):
    model = fresh(tiny_dir)
    tokens = random_batches(1)[0]
    before_logits, before_WQ = model(tokens), model.W_Q.copy()
    opt = training.AdamW(model, lr=1e-2)
    assert all(a.flags.writeable for _, a in model.weights.arrays())
    W_E, W_U = model.weights.W_E, model.weights.W_U  # still tied: one parameter, W_U a view of W_E
    assert W_U.shape == W_E.shape[::-1] and W_U.ctypes.data == W_E.ctypes.data and np.array_equal(W_U, W_E.T)
    assert np.array_equal(model(tokens), before_logits)  # installing copies changes nothing
    loss, grads = model.value_and_grad(tokens)
    opt.step(grads)
    after = model(tokens)
    assert not np.allclose(after, before_logits)
    # the forward pass uses exactly the optimizer's arrays: rebuild a model from them
    rebuilt = npgpt2.GPT2(model.cfg, weights_from_state_dict(
        hub_state_dict(model.weights, model.cfg.n_layer, dtype=np.float64), model.cfg, dtype="float64"))
    assert np.array_equal(rebuilt(tokens), after)
    assert np.array_equal(model.W_Q, rebuilt.W_Q) and not np.array_equal(model.W_Q, before_WQ)  # views rebuilt
    assert model.loss(tokens) < loss


def test_adamw_without_decay_equals_plain_adam(tiny_dir):
    """training.optim.Adam (the textbook formula, sqrt(v / c2) + eps) is an independent reference,
    given the same gradients at each step."""
    a = fresh(tiny_dir)
    params = params_of(a)
    opt, plain = training.AdamW(a, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0), Adam(lr=3e-3, betas=(0.9, 0.95))
    for tokens in random_batches(3):
        _, grads = a.value_and_grad(tokens)
        plain.step(params, {k: g.copy() for k, g in training.named_parameters(grads)})
        opt.step(grads)
    for name, p in params_of(a).items():
        assert np.max(np.abs(p - params[name])) <= 1e-13 * np.max(np.abs(p)), name


def test_adamw_gives_the_same_bits_on_any_number_of_threads(tiny_dir):
    # the update is spread over npgpt2's threads in chunks; each chunk's arithmetic is the same
    model = fresh(tiny_dir)
    grads = [model.value_and_grad(tokens)[1] for tokens in random_batches(2)]  # the same gradients for all
    results = []
    before = npgpt2.get_num_threads()
    try:
        for n in (1, 2, 3):
            npgpt2.set_num_threads(n)
            model = fresh(tiny_dir)
            opt = training.AdamW(model, lr=3e-3, weight_decay=0.1)
            for g in grads:
                opt.step(g)
            results.append(params_of(model))
    finally:
        npgpt2.set_num_threads(before)
    for other in results[1:]:
        for name, p in other.items():
            np.testing.assert_array_equal(p, results[0][name], err_msg=name)


def test_a_small_models_update_in_one_array_equals_the_update_parameter_by_parameter():
    # a small model's parameters, gradients and moments are updated as a few long arrays; a large
    # model's parameter by parameter (no copy of its gradients): the same arithmetic, element by element
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=64, n_ctx=32, vocab_size=300)
    batches = np.random.default_rng(0).integers(0, 300, (3, 4, 32))
    grads = [training.new_model(cfg, seed=0, dtype="float32").value_and_grad(tokens)[1] for tokens in batches]
    for decayed in (None, {"W_E", "blocks.0.ln1_b", "blocks.1.W_in"}):  # the layout's two runs; six
        results = []
        for whole in (True, False):
            model = training.new_model(cfg, seed=0, dtype="float32")
            opt = training.AdamW(model, lr=3e-3, weight_decay=0.1)
            assert opt._g is not None  # a small model: its gradients go into one array
            if decayed is not None:
                opt.decayed = decayed  # (as load_state_dict may bring: not the layout's order)
            if not whole:
                opt._g = None  # (as for a model above _SHARED parameters)
            assert len(training.adamw._runs(opt._layout, opt.decayed)) == (2 if decayed is None else 6)
            for g in grads:
                opt.step(g)
            results.append(params_of(model))
        for name, p in results[0].items():
            np.testing.assert_array_equal(p, results[1][name], err_msg=name)


def test_adamw_state_loads_into_its_one_array(tiny_dir, tmp_path):
    model = fresh(tiny_dir)
    opt = training.AdamW(model, lr=3e-3, weight_decay=0.1)
    for tokens in random_batches(2):
        opt.step(model.value_and_grad(tokens)[1])
    opt.save(tmp_path / "opt.safetensors")
    again = training.AdamW(fresh(tiny_dir), lr=3e-3, weight_decay=0.1)
    again.load(tmp_path / "opt.safetensors")
    for key in ("m", "v"):
        for name, a in getattr(opt, key).items():
            b = getattr(again, key)[name]
            np.testing.assert_array_equal(a, b, err_msg=name)
            assert np.shares_memory(b, again._flat[key]), name  # still a view of the one array


def test_weight_decay_is_decoupled_and_only_on_matrices_by_default(tiny_dir):
    model = fresh(tiny_dir)
    before = params_of(model)
    opt = training.AdamW(model, lr=0.1, weight_decay=0.5)
    assert opt.decayed == {n for n, p in before.items() if p.ndim == 2}
    assert {"W_E", "W_pos", "blocks.0.W_qkv", "blocks.1.W_out"} <= opt.decayed and "blocks.0.b_qkv" not in opt.decayed
    opt.step({n: np.zeros_like(p) for n, p in before.items()})  # zero gradient: decay alone moves p
    for name, p in params_of(model).items():
        expected = before[name] * (1 - 0.1 * 0.5) if name in opt.decayed else before[name]
        assert np.array_equal(p, expected), name
    only = training.AdamW(fresh(tiny_dir), decay=["W_E"])
    assert only.decayed == {"W_E"}
    assert training.AdamW(fresh(tiny_dir), decay=lambda n, p: n.endswith("_b")).decayed == {
        "blocks.0.ln1_b", "blocks.0.ln2_b", "blocks.1.ln1_b", "blocks.1.ln2_b", "ln_final_b"}
    with pytest.raises(ValueError, match="W_Q"):
        training.AdamW(fresh(tiny_dir), decay=["W_Q"])


def test_adamw_refuses_a_processed_model_and_replaced_weights(tiny_dir):
    with pytest.raises(ValueError, match="fold_ln"):
        training.AdamW(npgpt2.from_pretrained(tiny_dir, fold_ln=True))
    model = fresh(tiny_dir)
    opt = training.AdamW(model)
    _, grads = model.value_and_grad(random_batches(1)[0])
    model.weights = fresh(tiny_dir).weights
    with pytest.raises(ValueError, match="replaced"):
        opt.step(grads)


def test_optimizer_state_saved_and_loaded_continues_exactly(tiny_dir, tmp_path):
    steps = random_batches(4)
    a = fresh(tiny_dir)
    opt_a = training.AdamW(a, lr=training.warmup_cosine(1e-2, 1, 4), weight_decay=0.1)
    for tokens in steps:
        opt_a.step(a.value_and_grad(tokens)[1])
    b = fresh(tiny_dir)
    opt_b = training.AdamW(b, lr=training.warmup_cosine(1e-2, 1, 4), weight_decay=0.1)
    for tokens in steps[:2]:
        opt_b.step(b.value_and_grad(tokens)[1])
    opt_b.save(tmp_path / "opt.safetensors")
    saved = params_of(b)
    c = fresh(tiny_dir)
    opt_c = training.AdamW(c, lr=training.warmup_cosine(1e-2, 1, 4), weight_decay=0.1)
    for name, p in opt_c.params.items():
        p[...] = saved[name]
    opt_c.load(tmp_path / "opt.safetensors")
    assert opt_c.t == 2
    for tokens in steps[2:]:
        opt_c.step(c.value_and_grad(tokens)[1])
    for name, p in params_of(a).items():
        assert np.array_equal(p, params_of(c)[name]), name
    with pytest.raises(ValueError, match="no AdamW state"):
        from safetensors.numpy import save_file
        save_file({"x": np.zeros(1)}, tmp_path / "other.safetensors")
        opt_c.load(tmp_path / "other.safetensors")


# ---------------------------------------------------------------------------- clipping, accumulation
def test_clip_grad_norm_is_the_global_norm_with_the_tie_counted_once(tiny_dir):
    model = fresh(tiny_dir)
    _, grads = model.value_and_grad(random_batches(1)[0])
    flat = np.concatenate([a.reshape(-1) for _, a in grads.arrays() if _ != "W_U"])  # brute force
    expected = math.sqrt(float(flat @ flat))
    assert expected > 1
    total = training.clip_grad_norm(grads, 1.0)
    assert total == pytest.approx(expected, rel=1e-12)
    clipped = np.concatenate([a.reshape(-1) for _, a in grads.arrays() if _ != "W_U"])
    assert np.allclose(clipped, flat * 1.0 / (expected + 1e-6), rtol=1e-12, atol=0)
    assert np.array_equal(grads.W_U, grads.W_E.T)  # the tied view was scaled with W_E, once
    again = training.clip_grad_norm(grads, 10.0)  # below the threshold: nothing changes
    assert again == pytest.approx(1.0, rel=1e-6)
    assert np.array_equal(np.concatenate([a.reshape(-1) for _, a in grads.arrays() if _ != "W_U"]), clipped)


def test_gradient_accumulation_equals_one_large_batch(tiny_dir):
    big = random_batches(1, batch=4, seq=10)[0]
    a, b = fresh(tiny_dir), fresh(tiny_dir)
    loss_big, grads_big = a.value_and_grad(big)
    loss_acc, grads_acc = training.accumulate_grad(b, [big[:1], big[1:3], big[3:]])  # uneven micro-batches
    assert loss_acc == pytest.approx(loss_big, rel=1e-13)
    for (name, g), (_, h) in zip(training.named_parameters(grads_big), training.named_parameters(grads_acc)):
        assert np.max(np.abs(g - h)) <= 1e-12 * np.max(np.abs(g)), name
    opt_a, opt_b = training.AdamW(a, lr=1e-2), training.AdamW(b, lr=1e-2)
    opt_a.step(grads_big)
    opt_b.step(grads_acc)
    # 1e-9: the key bias's gradient is zero in exact arithmetic, and Adam divides its rounding noise
    # (1e-17) by sqrt(v) + eps: that part of the update is noise of order lr * 1e-9
    for name, p in params_of(a).items():
        assert np.max(np.abs(p - params_of(b)[name])) <= 1e-9 * np.max(np.abs(p)), name


# ------------------------------------------------------------------------------------- schedules
def test_schedules_by_hand():
    s = training.warmup_cosine(1.0, warmup=10, total=110, min_lr=0.1)
    assert [s(0), s(5), s(10)] == [0.0, 0.5, 1.0]
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway down the cosine
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 120))
    assert training.constant(3e-4)(12345) == 3e-4
    with pytest.raises(ValueError, match="warmup=20"):
        training.warmup_cosine(1.0, 20, 10)


# ------------------------------------------------------------------------------------------ data
def test_text_files_folder_and_texts_join_documents_with_endoftext(model, tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "b.txt").write_text("Second document.")
    (tmp_path / "docs" / "sub" / "c.txt").write_text("Third.")
    (tmp_path / "docs" / "a.txt").write_text("Hello world.")
    (tmp_path / "docs" / "skip.csv").write_text("not read")
    enc = model.tokenizer.encode
    expected = enc("Hello world.") + [ENDOFTEXT_ID] + enc("Second document.") + [ENDOFTEXT_ID] + enc("Third.")
    folder = training.TokenDataset.from_folder(tmp_path / "docs", model.tokenizer)
    assert folder.tokens.tolist() == expected
    files = training.TokenDataset.from_text_files(
        [tmp_path / "docs" / n for n in ("a.txt", "b.txt", "sub/c.txt")], model.tokenizer)
    assert files.tokens.tolist() == expected
    texts = training.TokenDataset.from_texts(iter(["Hello world.", "", "Second document.", "Third."]), model.tokenizer)
    assert texts.tokens.tolist() == expected


def test_bin_files_are_memory_mapped_nanogpt_and_llmc(model, tmp_path):
    data = training.TokenDataset(np.random.default_rng(0).integers(0, 50257, 1000))
    data.to_bin(tmp_path / "train.bin")
    loaded = training.TokenDataset.from_bin(tmp_path / "train.bin")
    assert isinstance(loaded.tokens, np.memmap) and loaded.tokens.dtype == np.uint16
    assert np.array_equal(loaded.tokens, data.tokens)
    header = np.zeros(256, np.int32)
    header[:3] = [20240520, 1, 1000]  # llm.c: magic, version, token count
    with open(tmp_path / "llmc.bin", "wb") as f:
        f.write(header.tobytes() + data.tokens.astype(np.uint16).tobytes())
    assert np.array_equal(training.TokenDataset.from_bin(tmp_path / "llmc.bin").tokens, data.tokens)


def test_batches_are_deterministic_resumable_windows(model):
    tokens = np.arange(1000) % 50000
    data = training.TokenDataset(tokens)
    first = [b for _, b in zip(range(5), data.batches(3, 16, seed=7))]
    again = [b for _, b in zip(range(5), data.batches(3, 16, seed=7))]
    later = [b for _, b in zip(range(2), data.batches(3, 16, seed=7, start=3))]
    other = next(data.batches(3, 16, seed=8))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert np.array_equal(later[0], first[3]) and np.array_equal(later[1], first[4])
    assert not np.array_equal(other, first[0])
    for b in first:  # windows of consecutive tokens
        assert b.shape == (3, 16) and b.dtype == np.int64
        assert np.all(np.diff(b, axis=1) == 1)
    train, val = data.split(0.1)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train.tokens, val.tokens]), tokens)


def test_data_errors_name_the_problem(model, tmp_path):
    with pytest.raises(training.DataError, match="missing.txt does not exist"):
        training.TokenDataset.from_text_files([tmp_path / "missing.txt"], model.tokenizer)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(training.DataError, match="no text"):
        training.TokenDataset.from_text_files([tmp_path / "empty.txt"], model.tokenizer)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(training.DataError, match="no tokens"):
        training.TokenDataset.from_bin(tmp_path / "empty.bin")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    with pytest.raises(training.DataError, match="even"):
        training.TokenDataset.from_bin(tmp_path / "odd.bin")
    with pytest.raises(training.DataError, match="too few for windows of seq_len=50"):
        next(training.TokenDataset(np.arange(20)).batches(2, 50))


# -------------------------------------------------------------------------------- save_pretrained
def test_save_pretrained_round_trip_is_exact(tiny_dir, tmp_path):
    model = npgpt2.from_pretrained(tiny_dir)
    opt = training.AdamW(model, lr=1e-2)
    opt.step(model.value_and_grad(random_batches(1)[0])[1])  # weights no file holds yet
    out = model.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        keys = set(f.keys())
        assert {f.get_tensor(k).dtype for k in keys} == {np.dtype(np.float32)}
    assert "wte.weight" in keys and "h.1.mlp.c_proj.weight" in keys
    assert not any(k.startswith("transformer.") or k == "lm_head.weight" for k in keys)
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["tie_word_embeddings"] is True and config["n_positions"] == model.cfg.n_ctx
    loaded = npgpt2.from_pretrained(out)
    for (name, a), (_, b) in zip(model.weights.arrays(), loaded.weights.arrays()):
        assert np.array_equal(a, b), name
    tokens = random_batches(1)[0]
    assert np.array_equal(loaded(tokens), model(tokens))
    assert loaded.to_tokens("Hello world").tolist() == model.to_tokens("Hello world").tolist()


def test_save_pretrained_refuses_processed_weights(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"processed \(fold_ln, center_writing_weights\).*without fold_ln"):
        npgpt2.from_pretrained(tiny_dir, fold_ln=True, center_writing_weights=True).save_pretrained(tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


def test_interrupted_save_leaves_the_previous_checkpoint(tiny_dir, tmp_path, monkeypatch):
    model = npgpt2.from_pretrained(tiny_dir)
    out = model.save_pretrained(tmp_path / "ckpt")
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    training.AdamW(model, lr=1e-2).step(model.value_and_grad(random_batches(1)[0])[1])

    import safetensors.numpy

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", broken)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(out)
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before  # no temp files either


# ------------------------------------------------------------------------------------ perplexity
@pytest.mark.parametrize("stride", [16, 7])
def test_perplexity_scores_each_token_once_with_its_window(model64, stride):
    """By hand, the guide's rule: window [b, b + 16) (b = 0, stride, ...) scores the tokens after
    the previous window's end, each predicted from the tokens of its window before it."""
    tokens = np.random.default_rng(3).integers(0, 50257, 50)
    result = training.perplexity(model64, tokens, window=16, stride=stride)
    nll, prev_end = [], 0
    for b in range(0, 50, stride):
        end = min(b + 16, 50)
        for i in range(max(prev_end, b + 1), end):
            nll.append(model64.loss(tokens[None, b:i + 1], per_token=True)[0, -1])
        prev_end = end
        if end == 50:
            break
    expected_count = 50 - 50 // 16 - 1 if stride == 16 else 49  # non-overlapping windows skip their first token
    assert result.n_tokens == len(nll) == expected_count
    assert result.loss == pytest.approx(np.mean(nll), rel=1e-12)
    assert result.perplexity == pytest.approx(math.exp(np.mean(nll)), rel=1e-12)


# ------------------------------------------------------------------------------ from scratch
def test_a_tiny_model_learns_a_repetitive_text_from_scratch():
    text = "The quick brown fox jumps over the lazy dog. " * 40
    model = training.new_model(npgpt2.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_ctx=32), seed=0)
    data = training.TokenDataset.from_texts([text], model.tokenizer)
    opt = training.AdamW(model, lr=1e-2, weight_decay=0.0)
    losses = []
    for _, batch in zip(range(40), data.batches(batch_size=4, seq_len=32, seed=0)):
        loss, grads = model.value_and_grad(batch)
        training.clip_grad_norm(grads, 1.0)
        opt.step(grads)
        losses.append(loss)
    assert losses[0] > 10  # ln(50257) = 10.8: it starts knowing nothing
    assert model.loss(data.batch(999, 4, 32, seed=0)) < 0.15
    out = model.generate("The quick", max_new_tokens=20)  # greedy
    assert len(out) > 90 and text.startswith(out), out  # the text, word for word


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-13), ("float32", 2e-6)])
def test_adamw_with_blas_axpby_equals_numpy_passes(tiny_dir, monkeypatch, dtype, tol):
    # the update takes BLAS's fused y = a x + b y where numpy's BLAS has it; NumPy's own passes
    # otherwise: the same numbers up to rounding
    from npgpt2 import threads
    from npgpt2.training import adamw

    assert threads.axpby(np.dtype(dtype)) is not None  # (numpy's OpenBLAS has it)
    results = []
    for blas in (True, False):
        if not blas:
            monkeypatch.setattr(adamw, "axpby", lambda dtype: None)
        model = fresh(tiny_dir, dtype=dtype)
        opt = training.AdamW(model, lr=training.warmup_cosine(1e-2, 1, 5), weight_decay=0.1)
        for tokens in random_batches(3):
            opt.step(fresh(tiny_dir, dtype=dtype).value_and_grad(tokens)[1])  # the same gradients for both
        results.append((params_of(model), opt))
    (fused, fused_opt), (plain, plain_opt) = results
    for name in fused:
        scale = np.abs(plain[name]).max()
        assert np.abs(fused[name] - plain[name]).max() <= tol * scale, name
        np.testing.assert_allclose(fused_opt.v[name], plain_opt.v[name], rtol=10 * tol, atol=1e-30, err_msg=name)
    assert max(np.abs(fused[n] - plain[n]).max() for n in fused) > 0  # they did take different passes


def _saved_files(folder) -> dict:
    return {n: open(os.path.join(folder, n), "rb").read() for n in sorted(os.listdir(folder))}


def test_a_killed_save_leaves_the_old_files_and_the_next_save_clears_its_staging(tiny_dir, tmp_path):
    """SIGKILL in the middle of writing the weights: the folder keeps the previous save, whole; the
    staging folder it left is deleted by the next save."""
    import signal
    import subprocess
    import sys
    import time

    out = str(tmp_path / "ckpt")
    before = _saved_files(npgpt2.from_pretrained(tiny_dir).save_pretrained(out))
    script = (
        "import sys, time, npgpt2, safetensors.numpy as s\n"
        "def slow(tensors, path, metadata=None):\n"
        "    open(path, 'wb').write(b'half a file'); print('writing', flush=True); time.sleep(60)\n"
        "s.save_file = slow\n"
        f"npgpt2.from_pretrained({str(tiny_dir)!r}).save_pretrained({out!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = [n for n in os.listdir(tmp_path) if n.startswith(".ckpt.")]
    assert left == [f".ckpt.tmp-{proc.pid}"]  # what the kill left
    assert _saved_files(out) == before
    model = npgpt2.from_pretrained(tiny_dir)
    model.save_pretrained(out)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]


def test_a_save_stopped_between_its_renames_is_put_back_by_the_next(tiny_dir, tmp_path, monkeypatch):
    """Stopped after the old folder was set aside and before the new one arrived: the next save
    restores nothing half-done, keeps what else the folder held, and never mixes two saves."""
    import npgpt2.save as save

    out = str(tmp_path / "run")
    model = npgpt2.from_pretrained(tiny_dir)
    model.save_pretrained(out)
    os.makedirs(os.path.join(out, "checkpoint"))
    open(os.path.join(out, "checkpoint", "trainer_state.json"), "w").write("{}")
    real_rename, calls = os.rename, []

    def stop_at_the_second(src, dst):
        calls.append(src)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(save.os, "rename", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(out)
    monkeypatch.setattr(save.os, "rename", real_rename)
    assert not os.path.exists(out)  # set aside, under .run.old-<pid>
    monkeypatch.setattr(save, "_alive", lambda pid: False)  # as after the process died
    save.recover(out)
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert os.path.exists(os.path.join(out, "checkpoint", "trainer_state.json"))
    training.AdamW(model, lr=1e-2).step(model.value_and_grad(random_batches(1)[0])[1])
    model.save_pretrained(out)  # over a folder with a checkpoint in it: the checkpoint stays
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json", "merges.txt", "model.safetensors", "vocab.json"]
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert np.array_equal(npgpt2.from_pretrained(out).W_E, model.W_E)


def test_staging_files_of_older_killed_saves_are_cleared(tiny_dir, tmp_path):
    """Earlier versions staged each file inside the folder (.model.safetensors.tmp-<pid>)."""
    out = npgpt2.from_pretrained(tiny_dir).save_pretrained(tmp_path / "m")
    dead = 2 ** 22 + 12345  # above Linux's default pid_max: no such process
    open(os.path.join(out, f".model.safetensors.tmp-{dead}"), "wb").write(b"x" * 1000)
    npgpt2.from_pretrained(tiny_dir).save_pretrained(out)
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]


def test_accumulation_weights_micro_batches_of_different_lengths_by_their_predicted_tokens(tiny_dir):
    """A micro-batch of 10 tokens predicts 9, one of 5 predicts 4: the accumulated loss is the mean
    over the 13 predictions, as one right-padded batch of both (its mask counts the same 13)."""
    rng = np.random.default_rng(8)
    long, short = rng.integers(0, 50257, (1, 10)), rng.integers(0, 50257, (1, 5))
    padded = np.concatenate([long, np.concatenate([short, np.zeros((1, 5), np.int64)], axis=1)])
    mask = np.array([[1] * 10, [1] * 5 + [0] * 5])
    loss_one, grads_one = fresh(tiny_dir).value_and_grad(padded, attention_mask=mask)
    loss_acc, grads_acc = training.accumulate_grad(fresh(tiny_dir), [long, short])
    assert loss_acc == pytest.approx(loss_one, rel=1e-12)
    for (name, g), (_, h) in zip(training.named_parameters(grads_one), training.named_parameters(grads_acc)):
        assert np.max(np.abs(g - h)) <= 1e-11 * np.max(np.abs(g)), name


def test_a_save_over_another_keeps_none_of_its_files(tiny_dir, tmp_path):
    """A word-vocabulary model saved over a GPT-2 one: the folder holds the new tokenizer's file only
    (an old vocab.json left beside it would be read in its place), and what else was there stays."""
    from npgpt2.tokenizer import WordTokenizer

    model = npgpt2.from_pretrained(tiny_dir)
    out = model.save_pretrained(tmp_path / "m")
    os.makedirs(os.path.join(out, "checkpoint"))
    npgpt2.GPT2(model.cfg, model.weights, WordTokenizer(["cat", "dog"])).save_pretrained(out)
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json", "model.safetensors", "tokenizer.json"]
