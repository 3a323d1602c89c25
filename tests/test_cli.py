"""The command line, driven as a user would: ``python -m npgpt2 ...`` in a subprocess, offline,
against a synthetic checkpoint in the hub cache (and a local folder)."""

import os
import subprocess
import sys

import numpy as np
import pytest

import npgpt2
from npgpt2 import cli
import by_hand


def run(args, hf_home, check=True):
    env = {**os.environ, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "npgpt2", *args], capture_output=True, text=True,
                          env=env, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def assert_user_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr


def test_help_explains_each_command(hf_home):
    out = run(["--help"], hf_home).stdout
    for command in ("generate", "tokens", "trace", "info", "download", "parity"):
        assert command in out
        sub = run([command, "--help"], hf_home).stdout
        assert "example:" in sub and f"npgpt2 {command}" in sub


def test_generate_streams_the_greedy_continuation(tiny_hub, hf_home):
    proc = run(["generate", "Hello, my dog", "--model", tiny_hub, "-n", "8"], hf_home)
    model = npgpt2.from_pretrained(tiny_hub)
    assert proc.stdout == model.to_string(by_hand.greedy(model, model.to_tokens("Hello, my dog")[0], 8)) + "\n"


def test_generate_sampling_is_reproducible(tiny_dir, hf_home):
    args = ["generate", "The dog", "-m", str(tiny_dir), "-n", "6", "-t", "0.8", "--top-k", "40", "--seed", "3"]
    assert run(args, hf_home).stdout == run(args, hf_home).stdout


def generate_in_process(capsys, *args):
    """``npgpt2 generate ...`` run in this process (quicker than a subprocess); its stdout."""
    assert cli.main(["generate", *args]) == 0
    return capsys.readouterr().out


def test_generate_seeds_give_different_samples(tiny_dir, capsys):
    # at temperature 2 the tiny model spreads its probability over thousands of tokens: five seeds
    # giving fewer than five different 4-token continuations would take a coincidence
    outs = {generate_in_process(capsys, "The dog", "-m", str(tiny_dir), "-n", "4", "-t", "2", "--seed", str(s))
            for s in range(5)}
    assert len(outs) == 5


def test_generate_top_k_1_is_greedy_at_any_temperature(tiny_dir, capsys):
    model = npgpt2.from_pretrained(tiny_dir)
    greedy = model.to_string(by_hand.greedy(model, model.to_tokens("The dog")[0], 6))
    for seed in ("0", "1"):
        out = generate_in_process(capsys, "The dog", "-m", str(tiny_dir), "-n", "6", "-t", "5", "--top-k", "1",
                                  "--seed", seed)
        assert out == greedy + "\n"


def top_k_path(model, ids, text, k):
    """Token ids, each among the k likeliest next tokens of the model given the ones before, that
    spell the bytes ``text`` after the prompt ``ids``; None if there are none."""
    if not text:
        return []
    logits = model(np.array([ids]))[0, -1]
    for t in np.argsort(-logits)[:k].tolist():
        piece = model.tokenizer.encoding.decode_single_token_bytes(t)
        if text.startswith(piece):
            rest = top_k_path(model, ids + [t], text[len(piece):], k)
            if rest is not None:
                return [t] + rest
    return None


def test_generate_samples_only_from_the_top_k(tiny_dir, capsys):
    model = npgpt2.from_pretrained(tiny_dir)
    prompt = "The dog"
    ids = model.to_tokens(prompt)[0].tolist()
    continuations = set()
    for seed in range(4):
        out = generate_in_process(capsys, prompt, "-m", str(tiny_dir), "-n", "6", "-t", "3", "--top-k", "3",
                                  "--seed", str(seed))
        assert out.startswith(prompt) and out.endswith("\n")
        new = out[len(prompt):-1]
        if "\ufffd" in new:  # a token ended inside a UTF-8 character: the bytes are not recoverable
            continue
        path = top_k_path(model, ids, new.encode("utf-8"), 3)
        assert path is not None and len(path) == 6, (seed, new)
        continuations.add(tuple(path))
    assert len(continuations) >= 2  # at temperature 3 the three are near equally likely


def test_tokens_side_by_side(tiny_hub, hf_home):
    out = run(["tokens", "Hello, my dog is cute", "--model", tiny_hub], hf_home).stdout
    assert "6 tokens" in out
    assert "15496  'Hello'" in out and "13779  ' cute'" in out


def test_trace_walks_every_hook_point_in_order(tiny_hub, hf_home):
    out = run(["trace", "The dog is", "--model", tiny_hub], hf_home).stdout
    model = npgpt2.from_pretrained(tiny_hub)
    names = [n for n in model.hook_names() if not n.endswith("hook_result")]
    positions = [out.index(n + " ") for n in names]
    assert positions == sorted(positions)
    assert "[1, 4, 3, 3]" in out  # a pattern's shape
    assert "last query attends most to: H0->" in out
    layer = run(["trace", "The dog", "--model", tiny_hub, "--layer", "1", "--names", "*attn.hook_*"], hf_home).stdout
    assert "blocks.1.attn.hook_result" in layer and "blocks.0." not in layer and "hook_mlp_out" not in layer


def test_info(tiny_hub, hf_home):
    out = run(["info", "--model", tiny_hub], hf_home).stdout
    assert "n_layer=2 n_head=4 d_model=64" in out
    assert f"{npgpt2.from_pretrained(tiny_hub).n_params():,}" in out
    assert "npgpt2-test/tiny-gpt2@main" in out and "blocks.{l}.attn.hook_pattern" in out
    assert os.path.join(hf_home, "hub", "models--npgpt2-test--tiny-gpt2") in out  # where the files are


def test_download_reports_cached_files(tiny_hub, hf_home):
    out = run(["download", tiny_hub], hf_home).stdout
    assert "model.safetensors" in out and os.path.join(hf_home, "hub") in out


def test_parity_without_reference_extra_says_how_to_install(monkeypatch, capsys, tiny_dir):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name in ("torch", "transformers"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    assert cli.main(["parity", "--model", str(tiny_dir)]) == 2  # 2: cannot run
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "npgpt2[reference]"' in err and "cannot run" in err


@pytest.mark.parametrize("text", ["", "   "])
def test_parity_refuses_an_empty_prompt(capsys, tiny_dir, text):
    """`npgpt2 parity ""` is a mistake, not a request for the default sentences."""
    assert cli.main(["parity", text, "--model", str(tiny_dir)]) == 2
    err = capsys.readouterr().err
    assert f"TEXT is {text!r}" in err and "expected a prompt" in err


@pytest.mark.parametrize("args,fragments", [
    (["generate", "hi", "--model", "gpt3"], ["unknown model 'gpt3'", "gpt2-medium"]),
    (["generate", "hi", "--model", "gpt2-large"], ["not in the local Hugging Face cache", "npgpt2 download gpt2-large"]),
    (["generate", "hi", "--temperature", "-1"], ["argument --temperature/-t: -1 must be 0 or more"]),
    (["generate", "hi", "-n", "0"], ["0 must be at least 1"]),
    (["generate", "hi", "--top-p", "2"], ["top_p=2.0"]),
    (["generate", "hi", "--top-k", "0"], ["argument --top-k: 0 must be at least 1"]),
    (["generate", "word " * 70], ["longer than the context of n_ctx=64"]),
    (["trace", "hi", "--layer", "7"], ["--layer 7 is out of range"]),
    (["trace", "hi", "--names", "*nothing*"], ["no hook point matches"]),
    (["generate", "hi", "--model", "/no/such/folder"], ["unknown model"]),
])
def test_user_errors_are_one_line_and_nonzero(args, fragments, tiny_hub, hf_home):
    if "--model" not in args:
        args = args + ["--model", tiny_hub]
    assert_user_error(run(args, hf_home, check=False), *fragments)


@pytest.mark.parametrize("args,flag", [
    (["generate", "hi", "--temperature", "nan"], "--temperature/-t: 'nan' is not a finite number"),
    (["generate", "hi", "--temperature", "inf"], "--temperature/-t: 'inf' is not a finite number"),
    (["generate", "hi", "--seed", "-1"], "--seed: -1 must be 0 or more"),
    (["harvest", "c.txt", "--out", "h", "--threshold", "nan"], "--threshold: 'nan' is not a finite number"),
    (["harvest", "c.txt", "--out", "h", "--scheduler-timeout", "-1"], "--scheduler-timeout: -1 must be more than 0"),
    (["dashboard", "h", "--out", "s", "--before", "-5"], "--before: -5 must be 0 or more"),
    (["finetune", "a.txt", "--out", "o", "--lr", "inf"], "--lr: 'inf' is not a finite number"),
    (["finetune", "a.txt", "--out", "o", "--grad-clip", "-1"], "--grad-clip: -1 must be 0 or more"),
    (["finetune", "a.txt", "--out", "o", "--eval-every", "-1"], "--eval-every: -1 must be 0 or more"),
    (["finetune", "a.txt", "--out", "o", "--seed", "-1"], "--seed: -1 must be 0 or more"),
])
def test_bad_numbers_are_refused_naming_the_flag(args, flag, capsys):
    """NaN, infinities and negative counts are refused before anything is loaded, and the message
    names the flag (rather than running and producing nonsense, or a library message without it)."""
    with pytest.raises(SystemExit) as exit:
        cli.main(args)
    assert exit.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"argument {flag}" in err, err


def test_console_script_is_declared():
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["scripts"]["npgpt2"] == "npgpt2.cli:main"


def test_lens_prints_the_table_and_draws_the_heatmap(tiny_hub, hf_home, tmp_path):
    png = tmp_path / "lens.png"
    out = run(["lens", "Hello, my dog is cute", "--model", tiny_hub, "--png", str(png)], hf_home).stdout
    for label in ("0_pre", "1_pre", "final_post", "0:Hello", "5:\u2423cute"):
        assert label in out
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args,fragment", [
    (["saliency", "The cat", "--png", "{missing}/x.png"], "--png '{missing}/x.png': the folder"),
    (["lens", "The cat", "--png", "{missing}/x.png"], "--png '{missing}/x.png': the folder"),
    (["lens", "The cat", "--png", "{tmp}"], "--png '{tmp}' is a folder"),
    (["circuit", "a b", "c d", "--answer", " a", "--wrong", " b", "--html", "{missing}/c.html"], "--html"),
    (["dashboard", "{tmp}", "--out", "{file}"], "--out '{file}' is a file"),
    (["finetune", "{file}", "--out", "{file}"], "--out '{file}' is a file"),
])
def test_outputs_that_cannot_be_written_are_refused_before_the_work(args, fragment, tmp_path, capsys, monkeypatch):
    """Checked before the model loads, so no run is lost to a bad output path at its end."""
    (tmp_path / "taken.txt").write_text("some text to train on")
    names = {"missing": str(tmp_path / "no-such-folder"), "tmp": str(tmp_path), "file": str(tmp_path / "taken.txt")}
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("loaded the model before checking the output"))
    assert cli.main([a.format(**names) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment.format(**names) in err, err


def test_generate_with_a_truncated_merges_file_is_one_line_naming_it(tiny_dir, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(tiny_dir, tmp_path / "model")
    merges = folder / "merges.txt"
    merges.write_bytes(merges.read_bytes()[:1000])
    assert cli.main(["generate", "hi", "-m", str(folder), "-n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(merges) in err and "download them again" in err, err


def test_every_flag_says_what_it_does():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices
    silent = [f"{name} {'/'.join(action.option_strings) or action.dest}"
              for name, sub in commands.items()
              for action in sub._actions if not action.help and action.dest != "help"]  # flags and positionals
    assert not silent, silent


@pytest.mark.parametrize("command", ["generate", "tokens", "trace", "saliency", "lens"])
def test_an_empty_text_points_to_the_flag(command, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("loaded the model for an empty text"))
    assert cli.main([command, ""]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--prepend-bos" in err and "prepend_bos=True" not in err, err


def test_saliency_notes_too_few_steps_without_a_python_warning(tiny_dir, capsys):
    assert cli.main(["saliency", "The cat sat on the", "-m", tiny_dir, "--steps", "1", "--target", " mat"]) == 0
    err = capsys.readouterr().err
    assert "UserWarning" not in err and "warnings.warn" not in err
    assert "npgpt2 saliency: note: integrated gradients: the scores add up to" in err and "(--steps, now 1)" in err


def test_the_lens_table_fits_the_terminal(tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    assert cli.main(["lens", "The Eiffel Tower is in the city of Paris, in France", "-m", tiny_dir]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines[1:]) <= 100, max(lines, key=len)
