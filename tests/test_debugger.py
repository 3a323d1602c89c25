"""The forward pass as a learner meets it in a debugger: few lines to the maths, names that stay put,
plain arrays, and a reference forward on one screen that every fast path equals."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import npgpt2
from npgpt2 import reference
from npgpt2.testing import assert_close

PACKAGE = os.path.dirname(npgpt2.__file__)

# Run in a fresh interpreter, so the tokenizer has not been built by an earlier test: load a model
# and at once trace model("The cat sat") line by line until the first attention score exists.
TRACE = r"""
import json, os, sys
import npgpt2
model = npgpt2.from_pretrained(sys.argv[1], attn_implementation="eager")
package = os.path.dirname(npgpt2.__file__)
counted, tokenizer_lines, found = [], [], {}

def local(frame, event, arg):
    if event == "line" and "scores" not in found:
        name = os.path.basename(frame.f_code.co_filename)
        if name not in ("hooks.py", "inputs.py", "tokenizer.py"):  # hook dispatch, input handling
            counted.append(f"{name}:{frame.f_lineno}")
        if "scores" in frame.f_locals:
            found["scores"] = (name, frame.f_code.co_name)
    if event == "line" and "pattern" in frame.f_locals and "pattern" not in found:
        found["pattern"] = [frame.f_code.co_name, list(frame.f_locals["pattern"].shape)]
    return local

def tracer(frame, event, arg):
    code = frame.f_code
    if code.co_name == "_build_encoding" or code.co_filename.endswith(os.path.join("tiktoken", "load.py")) \
            or (code.co_filename.endswith(os.path.join("tiktoken", "core.py")) and code.co_name == "__init__"):
        tokenizer_lines.append(code.co_name)  # building the BPE tables, not using them
    return local if code.co_filename.startswith(package) else None

sys.settrace(tracer)
model("The cat sat")
sys.settrace(None)
print(json.dumps({"counted": counted, "tokenizer": tokenizer_lines, "found": found}))
"""


@pytest.fixture(scope="module")
def trace(tiny_dir):
    out = subprocess.run([sys.executable, "-c", TRACE, tiny_dir], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_tokenizer_construction_inside_the_forward(trace):
    assert trace["tokenizer"] == []


def test_few_lines_from_the_forward_to_the_first_attention_score(trace):
    # npgpt2's own lines, hook dispatch and input handling excluded
    assert "scores" in trace["found"], "the eager path never bound `scores`"
    assert trace["found"]["scores"][0] == "model.py"
    assert len(trace["counted"]) <= 62, trace["counted"]  # (padding and the fast-path choice: 2 lines more than before)
    assert all(line.split(":")[0] in ("model.py", "ops.py", "config.py") for line in trace["counted"]), trace["counted"]


def test_the_eager_path_binds_pattern_in_the_attention_frame(trace):
    function, shape = trace["found"]["pattern"]
    assert function == "_attention"
    assert shape == [1, 4, 3, 3]  # [batch, head, query_pos, key_pos] for "The cat sat"


def test_step_through_stops_in_the_maths_only(model):
    # a scripted session: 40 steps into the forward, then on to the line after the pattern is
    # computed, where the pattern's shape is printed
    import inspect

    lines, first = inspect.getsourcelines(npgpt2.model.GPT2._attention)
    after = first + next(i for i, line in enumerate(lines) if line.strip().startswith("z_heads = pattern @"))
    commands = ["s"] * 40 + [f"b {npgpt2.model.__file__}:{after}", "c", "p pattern.shape", f"clear {npgpt2.model.__file__}:{after}", "c"]
    out = io.StringIO()
    logits = npgpt2.step_through(model, "The cat sat", stdin=io.StringIO("\n".join(commands) + "\n"),
                                 stdout=out)
    transcript = out.getvalue()
    stops = [line for line in transcript.splitlines() if line.startswith("> ")]
    files = {os.path.basename(line[2:].split("(")[0]) for line in stops}
    assert files <= {"model.py", "ops.py"}, files
    assert stops[0].endswith("forward()")
    assert "(1, 4, 3, 3)" in transcript  # pattern [batch, head, query_pos, key_pos] was there to print
    assert_close(model("The cat sat"), logits, rel=1e-5)  # the walk's eager path; model() takes fast.py
    assert model.attn_implementation == "blockwise"  # put back


def test_attn_implementation_is_checked_and_both_paths_agree(tiny_dir, model, model64):
    with pytest.raises(ValueError, match="attn_implementation='flash'"):
        npgpt2.from_pretrained(tiny_dir, attn_implementation="flash")
    tokens = np.random.default_rng(3).integers(0, 50257, (2, 64))  # n_ctx: several query blocks
    for m, tol in ((model, 1e-5), (model64, 1e-12)):
        blockwise = m(tokens)
        m.attn_implementation = "eager"
        try:
            eager = m(tokens)
        finally:
            m.attn_implementation = "blockwise"
        assert_close(blockwise, eager, rel=tol)
        assert np.abs(eager).max() > 1  # not a comparison of zeros


def _oracle(m, tokens):
    return np.stack([reference.gpt2(row, m.weights, m.cfg.n_head, m.cfg.layer_norm_epsilon) for row in tokens])


def test_every_fast_path_equals_the_one_screen_reference(model64, tiny_dir):
    tokens = np.random.default_rng(4).integers(0, 50257, (2, 64))
    expected = _oracle(model64, tokens)
    assert np.abs(expected).max() > 1
    np.testing.assert_allclose(model64(tokens), expected, atol=1e-10, rtol=0)  # blockwise
    logits, _ = model64.run_with_cache(tokens)  # eager (the cache asks for the pattern)
    np.testing.assert_allclose(logits, expected, atol=1e-10, rtol=0)
    kv = npgpt2.KeyValueCache(model64.cfg, 2, model64.dtype)  # one position at a time
    steps = [model64(tokens[:, :40], past_kv=kv)] + [model64(tokens[:, p:p + 1], past_kv=kv) for p in range(40, 64)]
    np.testing.assert_allclose(np.concatenate(steps, axis=1), expected, atol=1e-10, rtol=0)
    resid = model64(tokens, stop_at_layer=1)  # split at a layer
    np.testing.assert_allclose(model64(resid, start_at_layer=1), expected, atol=1e-10, rtol=0)
    processed = npgpt2.from_pretrained(tiny_dir, dtype="float64", fold_ln=True)  # folded weights
    np.testing.assert_allclose(_oracle(processed, tokens), expected, atol=1e-9, rtol=0)
    np.testing.assert_allclose(processed(tokens), expected, atol=1e-9, rtol=0)


def test_the_reference_is_independent_of_ops(monkeypatch, model64):
    # the oracle must not go through ops.py: breaking ops must not change it
    tokens = np.arange(5)
    before = reference.gpt2(tokens, model64.weights, 4)
    monkeypatch.setattr(npgpt2.ops, "softmax", lambda x, axis=-1, out=None: np.ones_like(x))
    monkeypatch.setattr(npgpt2.ops, "gelu_new", lambda x, out=None: x * 0)
    np.testing.assert_array_equal(reference.gpt2(tokens, model64.weights, 4), before)
    assert not np.allclose(model64(tokens)[0], before)


def test_cached_activations_and_weight_views_are_plain_arrays(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: True)
    for name, act in cache.items():
        assert type(act) is np.ndarray, (name, type(act))
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "W_in", "b_out", "W_E", "W_pos", "W_U"):
        view = getattr(model, name)
        assert isinstance(view, np.ndarray), name  # a read-only ndarray whose writes say how to edit
        assert not view.flags.writeable, name
        for computed in (view + 0, view * 2, view.sum(0), np.array(view), view[..., :1] @ np.ones((1, 2), view.dtype)):
            assert type(computed) is np.ndarray, name  # what is computed from it is plain
    assert model.W_Q is model.W_Q  # built once
    # and right: head 1 of layer 0's query matrix is columns d_head..2*d_head of W_qkv
    np.testing.assert_array_equal(model.W_Q[0, 1], model.weights.blocks[0].W_qkv[:, 16:32])
    np.testing.assert_array_equal(model.W_V[1, 3], model.weights.blocks[1].W_qkv[:, 128 + 48:128 + 64])


def test_weight_views_follow_processing(tiny_dir):
    m = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    before = m.W_in
    m.process_weights(fold_ln=True)
    assert m.W_in is not before
    np.testing.assert_allclose(m.W_in[0], m.weights.blocks[0].W_in)
    assert not np.allclose(m.W_in, before)


def test_old_import_paths_still_work():
    import importlib

    for path, names in {
        "npgpt2.analysis.patching": ["get_act_patch_resid_pre", "logit_diff_metric", "generic_activation_patch"],
        "npgpt2.analysis.head_detector": ["detect_head", "induction_scores"],
        "npgpt2.training.sae": ["train_sae", "activation_batches"],
        "npgpt2.training.toy_models": ["train_toy_models"],
        "npgpt2.training.optim": ["Adam"],
        "npgpt2.model": ["GPT2", "KeyValueCache", "HookPoint", "HookError", "InputError"],
        "npgpt2.cache": ["ActivationCache", "get_act_name"],
    }.items():
        module = importlib.import_module(path)
        for name in names:
            assert callable(getattr(module, name)), f"{path}.{name}"


def test_the_documented_debugger_walk_is_what_pdb_does(model):
    # Replay the pdb session of docs/forward-pass.md; every stop it shows must be where pdb really stops.
    page = open(os.path.join(os.path.dirname(PACKAGE), "docs", "forward-pass.md"), encoding="utf-8").read()
    walk = page.split('>>> npgpt2.step_through(model, "The cat sat")\n', 1)[1].split("```", 1)[0]
    commands = [line[len("(Pdb) "):].split("#")[0].strip() for line in walk.splitlines()
                if line.startswith("(Pdb) ")]
    stops = [line[2:] for line in walk.splitlines() if line.startswith("> ")]
    assert len(commands) >= 8 and len(stops) >= 5
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(os.path.dirname(PACKAGE))  # `b npgpt2/model.py:N` as typed in the project folder
    try:
        npgpt2.step_through(model, "The cat sat", stdin=io.StringIO("\n".join(commands) + "\n"), stdout=out)
    finally:
        os.chdir(cwd)
    transcript = out.getvalue()
    assert "***" not in transcript, transcript  # no command failed (an unbound name, a bad line)
    for stop in stops:
        assert stop in transcript, (stop, transcript)
    assert "array([[ 464, 3797, 3332]])" in transcript  # "The cat sat"


def test_step_command_opens_the_debugger_at_the_forward(tiny_dir):
    proc = subprocess.run([sys.executable, "-m", "npgpt2", "step", "The cat sat", "-m", tiny_dir],
                          input="p input\np self.attn_implementation\nc\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "model.py(" in proc.stdout and ")forward()" in proc.stdout
    assert "'The cat sat'" in proc.stdout and "'eager'" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
