"""The forward pass as a learner meets it in a debugger: few lines to the maths, names that stay put,
plain arrays, and a reference forward on one screen that every fast path equals."""

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest

import npgpt2
from npgpt2 import reference
from npgpt2.debug import BreakError, breakpoint_for
from npgpt2.testing import assert_close

import pdb_walk

PACKAGE = os.path.dirname(npgpt2.__file__)
ROOT = os.path.dirname(PACKAGE)

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
        if name not in ("hooks.py", "inputs.py", "tokenizer.py", "fast.py", "threads.py", "memory.py"):  # hook dispatch,
            # input handling, and how a product is cut into pieces and given its BLAS threads (fast.linear,
            # threads.own_blas; the debugger does not stop there either)
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
    assert len(trace["counted"]) <= 40, trace["counted"]  # (62 before checks, masks and path choices left the maths)
    assert all(line.split(":")[0] in ("model.py", "ops.py", "config.py") for line in trace["counted"]), trace["counted"]


def test_the_eager_path_binds_pattern_in_the_attention_frame(trace):
    function, shape = trace["found"]["pattern"]
    assert function == "_attention"
    assert shape == [1, 4, 3, 3]  # [batch, head, query_pos, key_pos] for "The cat sat"


def test_step_through_stops_in_the_maths_only(model):
    # a scripted session: 40 steps into the forward, then a breakpoint by name on the second
    # layer's attention, and on to the line after its pattern is computed, where it is printed
    commands = ["s"] * 40 + ["b GPT2._attention, l == 1", "c"] + ["n"] * 8 + ["p l, pattern.shape", "c"]
    out = io.StringIO()
    logits = npgpt2.step_through(model, "The cat sat", stdin=io.StringIO("\n".join(commands) + "\n"), stdout=out)
    transcript = out.getvalue()
    stops = [line for line in transcript.splitlines() if line.startswith("> ")]
    files = {os.path.basename(line[2:].split("(")[0]) for line in stops}
    assert files == {"model.py"}, files  # not hooks.py, inputs.py, ops.py, NumPy ...
    functions = {re.search(r"\)(\w+)\(\)", line)[1] for line in stops}
    assert functions <= {"forward", "_forward", "_embed", "_block", "_layer_norm", "_attention", "_mlp", "_unembed"}, functions
    assert stops[0].endswith(")forward()")
    assert "***" not in transcript, transcript
    assert "(1, (1, 4, 3, 3))" in transcript  # pattern [batch, head, query_pos, key_pos], in layer 1
    assert_close(model("The cat sat"), logits, rel=1e-5)  # the walk's eager path; model() takes fast.py
    assert model.attn_implementation == "blockwise"  # put back


def test_breakpoints_by_name_are_the_first_lines_of_the_parts(model):
    import inspect

    for part, method in (("embed", "_embed"), ("block", "_block"), ("layer_norm", "_layer_norm"),
                         ("attention", "_attention"), ("mlp", "_mlp"), ("unembed", "_unembed")):
        file, line, condition = breakpoint_for(part)
        function = getattr(npgpt2.model.GPT2, method)
        assert os.path.isabs(file) and os.path.samefile(file, npgpt2.model.__file__)
        lines, first = inspect.getsourcelines(function)
        statement = lines[line - first].strip()
        assert not statement.startswith(('"""', "def ")) and statement, (part, statement)
        assert condition is None
    assert breakpoint_for("1 attention", n_layer=2)[2] == "l == 1"
    assert breakpoint_for("0 layer_norm")[2] == "name.startswith('blocks.0.')"
    for bad, said in (("attn", "expected one of embed, block, layer_norm, attention, mlp, unembed"),
                      ("2 attention", "layer 2 is out of range for a model of 2 layers"),
                      ("1 unembed", "unembed is not in a layer"), ("3", "expected one of"),
                      ("mlp attention", "expected one of")):
        with pytest.raises(BreakError, match=re.escape(f"break at {bad!r}: ")) as e:
            breakpoint_for(bad, n_layer=2)
        assert said in str(e.value)
    with pytest.raises(BreakError, match="'attn'"):  # before the debugger starts
        npgpt2.step_through(model, "The cat sat", break_at="attn", stdin=io.StringIO("c\n"), stdout=io.StringIO())


def test_each_named_breakpoint_stops_in_its_part(model):
    for part, function, value in (("embed", "_embed", "tokens"), ("0 block", "_block", "l"),
                                  ("1 layer_norm", "_layer_norm", "name"), ("1 attention", "_attention", "l"),
                                  ("0 mlp", "_mlp", "l"), ("unembed", "_unembed", "resid.shape")):
        out = io.StringIO()
        npgpt2.step_through(model, "The cat sat", break_at=part, stdin=io.StringIO(f"p {value}\nq\n"), stdout=out)
        first = out.getvalue().splitlines()[0]
        assert re.fullmatch(rf"> .*model\.py\(\d+\){function}\(\)", first), (part, first)
        printed = out.getvalue().split("(Pdb) ")[1].strip()
        expected = {"tokens": "array([[ 464, 3797, 3332]])", "l": part.split()[0], "name": "'blocks.1.ln1.'",
                    "resid.shape": "(1, 3, 64)"}[value]
        assert printed == expected, (part, printed)


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


def _console_script() -> str:
    """The ``npgpt2`` command installed with the package (``pip install -e .``)."""
    name = "npgpt2.exe" if os.name == "nt" else "npgpt2"
    script = os.path.join(sysconfig.get_path("scripts"), name)
    script = script if os.path.exists(script) else shutil.which("npgpt2")
    if script is None:
        pytest.fail("the npgpt2 command is not installed: pip install -e . installs it")
    return script


def _walks(page: str) -> list[str]:
    """The ``$ npgpt2 step ...`` sessions shown in a markdown page."""
    blocks, block = [], None
    for line in open(os.path.join(ROOT, page), encoding="utf-8").read().splitlines():
        if line.startswith("```"):  # a fence opens or closes a block
            blocks, block = (blocks + ["\n".join(block)], None) if block is not None else (blocks, [])
        elif block is not None:
            block.append(line)
    return [b for b in blocks if b.startswith("$ npgpt2 step")]


def _pattern(shown: str) -> str:
    """A line as the docs show it -> a regular expression: "..." stands for anything (the absolute
    path, a line number, an array)."""
    return ".*".join(re.escape(piece) for piece in shown.split("..."))


def _replay(walk: str, tiny_dir: str, cwd: str) -> str:
    """Run a documented session with the npgpt2 command in ``cwd``, typing its commands one by one,
    and check that every stop it shows is where pdb stops, in order. The transcript."""
    lines = walk.splitlines()
    argv = [_console_script()] + shlex.split(lines[0][2:])[1:] + ["-m", tiny_dir]  # $ npgpt2 step ...
    commands = _commands(walk)
    assert sum(line.startswith("> ") for line in lines) >= 3 and lines[-1].startswith("npgpt2 step: ")
    session = pdb_walk.Session(argv, cwd=cwd)
    try:
        for command in commands[:-1]:
            session.send(command)
        session.finish(commands[-1] + "\n")
    finally:
        session.close()
    assert session.proc.returncode == 0, session.transcript
    at = _check_stops(walk, session.transcript)
    assert re.search(f"^{_pattern(lines[-1])}$", session.transcript[at:], re.M), (lines[-1], session.transcript[at:])
    return session.transcript


def _commands(walk: str) -> list[str]:
    return [line[len("(Pdb) "):].split("  #")[0].strip() for line in walk.splitlines() if line.startswith("(Pdb) ")]


_WHERE = re.compile(r"^> (?P<file>.+?)\((?P<line>\d+)\)(?P<function>[\w<>]+)\(\)", re.M)


def _check_stops(walk: str, transcript: str) -> int:
    """The stops ``walk`` shows (each "> ..." line and the "-> ..." source after it) are the stops in
    ``transcript``, one for one, and no command failed. Where the last one ends. The transcript's
    stops are read as pdb prints them, or as IPython's debugger does (in colour, with context)."""
    import linecache

    lines = walk.splitlines()
    shown = [(where, lines[i + 1]) for i, where in enumerate(lines) if where.startswith("> ")]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", transcript)
    assert "***" not in plain, plain  # no command failed (an unknown name, a file not found)
    stops = list(_WHERE.finditer(plain))
    assert len(stops) == len(shown), ([m[0] for m in stops], [w for w, _ in shown])
    for stop, (where, source) in zip(stops, shown):
        where = where.split("()")[0] + "()"  # (a return shows its value after it)
        assert re.fullmatch(_pattern(where), stop[0]), (where, stop[0])
        line = linecache.getline(stop["file"], int(stop["line"])).rstrip("\n").strip()
        assert re.fullmatch(_pattern(source[len("-> "):]), line), (source, line)
    return stops[-1].end() if stops else 0


@pytest.mark.parametrize("page", ["README.md", "docs/forward-pass.md"])
def test_the_documented_walks_are_what_pdb_does_from_any_folder(page, tiny_dir, tmp_path):
    # the npgpt2 command, in a folder outside the project: every stop shown is where pdb stops
    walks = _walks(page)
    assert walks, f"{page} shows no npgpt2 step session"
    for walk in walks:
        transcript = _replay(walk, tiny_dir, str(tmp_path))
        if "p call.tokens" in walk:
            assert "array([[ 464, 3797, 3332]])" in transcript  # "The cat sat"
        if "p scores.shape" in walk:
            assert "(1, 4, 3, 3)" in transcript  # [batch, head, query_pos, key_pos] of the tiny model


class _Kernel:
    """An ipykernel kernel (as Jupyter runs one) started in ``cwd``; ``run`` executes a cell and
    answers the debugger's prompts with ``answers``."""

    def __init__(self, cwd):
        from jupyter_client.manager import start_new_kernel

        self.manager, self.client = start_new_kernel(kernel_name="python3", cwd=cwd, env=dict(os.environ))

    def run(self, code: str, answers=()) -> tuple[str, dict]:
        """(what the cell printed, with each prompt and the answer typed, as a terminal shows them;
        the execute reply's content)"""
        answers, printed = list(answers), []

        def output(msg):
            if msg["msg_type"] == "stream":
                printed.append(msg["content"]["text"])
            elif msg["msg_type"] == "error":
                printed.append("\n".join(msg["content"]["traceback"]))

        def stdin(msg):
            answer = answers.pop(0) if answers else "c"
            printed.append(msg["content"]["prompt"] + answer + "\n")
            self.client.input(answer)

        reply = self.client.execute_interactive(code, allow_stdin=True, output_hook=output, stdin_hook=stdin,
                                                timeout=180)
        return "".join(printed), reply["content"]

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.mark.notebooks
def test_the_walks_work_in_a_jupyter_kernel(tiny_dir, tmp_path):
    # step_through in a cell, pdb.set_trace() in a cell and %debug after an error, in a kernel
    # started outside the project (its debugger is IPython's), with the commands the docs show
    pytest.importorskip("ipykernel")
    pytest.importorskip("jupyter_client")
    kernel = _Kernel(str(tmp_path))
    try:
        printed, reply = kernel.run(f"import npgpt2\nmodel = npgpt2.from_pretrained({tiny_dir!r})")
        assert reply["status"] == "ok", printed
        for page in ("README.md", "docs/forward-pass.md"):
            for walk in _walks(page):
                args = shlex.split(walk.splitlines()[0][2:])
                breaks = [args[i + 1] for i, a in enumerate(args) if a == "--break"]
                printed, reply = kernel.run(f"logits = npgpt2.step_through(model, {args[2]!r}, break_at={breaks!r})",
                                            _commands(walk))
                assert reply["status"] == "ok", printed
                _check_stops(walk, printed)
                printed, _ = kernel.run("print(logits.shape)")
                assert printed.strip() == "(1, 3, 50257)"

        code = 'model.attn_implementation = "eager"\nimport pdb; pdb.set_trace()\nlogits = model("The cat sat")'
        printed, reply = kernel.run(code, ["b npgpt2.model.GPT2._attention, l == 1", "c", "p l", "c"])
        printed = re.sub(r"\x1b\[[0-9;]*m", "", printed)
        assert reply["status"] == "ok" and "***" not in printed, printed
        stops = _WHERE.findall(printed)
        assert [(os.path.basename(f), function) for f, _, function in stops][-1:] == [("model.py", "_attention")], printed
        assert re.search(r"_attention\(\)(.|\n)*^1$", printed, re.M), printed  # `p l`: in layer 1

        printed, reply = kernel.run('model.run_with_hooks("The cat sat", fwd_hooks=[("blocks.1.attn.hook_pattern", '
                                    'lambda a, h: a[:, :1])])')
        assert reply["status"] == "error" and "HookError" in printed
        printed, reply = kernel.run("%debug", ["u", "u", "p l, scores.shape", "q"])
        printed = re.sub(r"\x1b\[[0-9;]*m", "", printed)
        assert "***" not in printed, printed
        assert re.search(r"_attention\(\)", printed) and "(1, (1, 4, 3, 3))" in printed, printed
    finally:
        kernel.close()


LOGITS = "'logits' in locals() or getattr(locals().get('__return__'), 'shape', (0,))[-1:] == (50257,)"


def _count(argv, cwd, score, path, home):
    """(stops with `s` alone to the first score, knowing the path to it, and on to the logits)"""
    session = pdb_walk.Session(argv, cwd=cwd)
    try:
        alone = pdb_walk.walk(session, score, pdb_walk.only_step)
    finally:
        session.close()
    session = pdb_walk.Session(argv, cwd=cwd)
    try:
        known = pdb_walk.walk(session, score, pdb_walk.knowing(path))
        on = pdb_walk.walk(session, LOGITS, pdb_walk.home(home))
    finally:
        session.close()
    return alone, known, known + on


def test_the_stepped_path_to_the_scores_and_the_logits_is_short(tiny_dir, tmp_path):
    # pdb driven through the npgpt2 command as a learner would, stop by stop, from the first line
    # of the forward pass on "The cat sat" to the first attention score (`scores` bound)
    argv = [_console_script(), "step", "The cat sat", "-m", tiny_dir]
    alone, known, to_logits = _count(argv, str(tmp_path), "'scores' in locals()",
                                     {"forward", "_forward", "_block", "_attention"}, "_forward")
    assert len(known) <= 20, [str(s) for s in known]
    assert len(to_logits) <= 30, [str(s) for s in to_logits]
    assert len(alone) <= 40, [str(s) for s in alone]
    # `s` alone stops in the maths only: model.py's own functions, no property, no helper
    assert {(os.path.basename(s.file), s.function) for s in alone} <= {
        ("model.py", f) for f in ("forward", "_forward", "_embed", "_block", "_layer_norm", "_attention")}, \
        [str(s) for s in alone]
    # the counts the docs give are these
    page = open(os.path.join(ROOT, "docs", "forward-pass.md"), encoding="utf-8").read()
    said = re.search(r"attention score,\s+(\d+) knowing the way .*? and (\d+) with `s` alone; (\d+) on to the logits", page, re.S)
    assert said and [int(n) for n in said.groups()] == [len(known), len(alone), len(to_logits)], said


def test_the_reference_path_is_counted_the_same_way(tiny_dir, tmp_path):
    code = ("import pdb, sys, npgpt2; from npgpt2 import reference; m = npgpt2.from_pretrained(sys.argv[1]); "
            "t = m.to_tokens('The cat sat')[0]; "
            "pdb.Pdb(skip=['numpy', 'numpy.*']).runcall(reference.gpt2, t, m.weights, m.cfg.n_head)")
    alone, known, to_logits = _count([sys.executable, "-c", code, tiny_dir], str(tmp_path), "'scores' in locals()",
                                     {"gpt2", "block", "mha", "<listcomp>", "attention"}, "gpt2")
    page = open(os.path.join(ROOT, "docs", "forward-pass.md"), encoding="utf-8").read()
    said = re.search(r"`reference\.py`, counted the same way: (\d+), (\d+) and (\d+)\.", page)
    assert said and [int(n) for n in said.groups()] == [len(known), len(alone), len(to_logits)], said


def test_step_command_says_how_the_walk_ended(tiny_dir, tmp_path):
    script = _console_script()
    proc = subprocess.run([script, "step", "The cat sat", "-m", tiny_dir], input="p input\np self.attn_implementation\nc\n",
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "model.py(" in proc.stdout and ")forward()" in proc.stdout
    assert "'The cat sat'" in proc.stdout and "'eager'" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "README" in proc.stderr and "Step through the forward pass" in proc.stderr  # the banner's pointer
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "## Step through the forward pass" in readme
    assert "npgpt2 step: the forward pass ran to the end: logits of shape [1, 3, 50257]" in proc.stdout

    proc = subprocess.run([script, "step", "-m", tiny_dir], input="q\n", capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and "the debugger was quit before the forward pass finished" in proc.stdout

    proc = subprocess.run([script, "step", "-m", tiny_dir, "--break", "attn"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert "break at 'attn': expected one of embed, block, layer_norm, attention, mlp, unembed" in proc.stderr
