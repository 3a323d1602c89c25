"""``npgpt2 finetune`` and ``npgpt2 eval`` as a user runs them: outputs, resuming exactly after Ctrl-C,
and one clear line (exit 2) for bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

import npgpt2
from npgpt2 import cli, training

TEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. " * 30
ARGS = ["--batch", "2", "--seq-len", "24", "--lr", "3e-3", "--warmup", "2", "--eval-every", "3"]


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    path = tmp_path_factory.mktemp("notes") / "notes.txt"
    path.write_text(TEXT)
    return str(path)


def in_process(capsys, *args):
    """``npgpt2 ...`` in this process: (exit code, stdout, stderr)."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def env(hf_home):
    return {**os.environ, "HF_HOME": hf_home, "HF_HUB_OFFLINE": "1", "OPENBLAS_NUM_THREADS": "1"}


def one_line(err, *fragments):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err


def test_finetune_then_eval_then_generate(tiny_dir, notes, tmp_path, capsys):
    out = str(tmp_path / "my-gpt2")
    code, stdout, err = in_process(capsys, "finetune", notes, "-m", tiny_dir, "--steps", "6", "--out", out,
                                   "--progress", *ARGS)
    assert code == 0, err
    assert "loss=" in err and "tok_s=" in err and "6/6" in err  # the bar: loss, tokens/s, steps
    assert err.count("val loss") == 2  # evaluated after steps 3 and 6
    state = json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))
    losses = [h["loss"] for h in state["history"]]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert f"training loss (each step's batches, nats/token) {losses[0]:.4f} -> {losses[-1]:.4f}" in stdout
    assert sorted(os.listdir(out)) == ["checkpoint", "config.json", "merges.txt", "model.safetensors", "vocab.json"]

    trained = npgpt2.from_pretrained(out)
    data = training.TokenDataset.from_text_files([notes], trained.tokenizer)
    expected = training.perplexity(trained, data, stride=16)
    code, stdout, err = in_process(capsys, "eval", notes, "-m", out, "--stride", "16")
    assert code == 0, err
    assert f"loss {expected.loss:.4f} nats/token, perplexity {expected.perplexity:.3f}" in stdout
    assert f"in {expected.n_windows} windows of 64, stride 16" in stdout
    data.to_bin(tmp_path / "notes.bin")  # the same tokens from a nanoGPT .bin file
    code, stdout_bin, _ = in_process(capsys, "eval", str(tmp_path / "notes.bin"), "-m", out, "--stride", "16")
    assert code == 0 and stdout_bin.split(": ", 1)[1] == stdout.split(": ", 1)[1]

    code, stdout, _ = in_process(capsys, "generate", "The quick", "-m", out, "-n", "5")
    assert code == 0 and stdout == trained.generate("The quick", max_new_tokens=5) + "\n"

    other = tmp_path / "other.txt"
    other.write_text("Some other text entirely. " * 40)
    code, _, err = in_process(capsys, "finetune", str(other), "--out", out, "--resume", "--steps", "8")
    assert code == 2
    one_line(err, "the data differs from the data of the checkpoint")


@pytest.fixture
def one_thread():
    """This process on one thread, as the subprocesses (OPENBLAS_NUM_THREADS=1): BLAS may round a
    float64 product differently on another number of threads, and bit-for-bit comparisons of runs
    hold on one machine set-up."""
    before = npgpt2.get_num_threads()
    npgpt2.set_num_threads(1)
    yield
    npgpt2.set_num_threads(before)


def test_ctrl_c_saves_and_resume_equals_the_uninterrupted_run(tiny_dir, notes, tmp_path, hf_home, capsys, one_thread):
    """float64: the run stopped by Ctrl-C and resumed ends with the same parameters and optimizer
    state as the run never stopped, bit for bit."""
    args = [notes, "-m", tiny_dir, "--dtype", "float64", "--steps", "10", *ARGS]
    whole = str(tmp_path / "whole")
    assert in_process(capsys, "finetune", *args, "--out", whole)[0] == 0

    cut = str(tmp_path / "cut")
    proc = subprocess.Popen([sys.executable, "-m", "npgpt2", "finetune", *args, "--out", cut,
                             "--checkpoint-every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(hf_home))
    state = os.path.join(cut, "checkpoint", "trainer_state.json")
    deadline = time.time() + 60
    while not os.path.exists(state) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    one_line(stderr, "interrupted after step", "checkpoint saved", "--resume")
    stopped_at = json.load(open(state))["step"]
    assert 1 <= stopped_at < 10
    assert not os.path.exists(os.path.join(cut, "model.safetensors"))  # no final model: it did not finish

    code, stdout, err = in_process(capsys, "finetune", notes, "--out", cut, "--resume")
    assert code == 0, err
    assert f"at step {stopped_at} of 10" in err
    for name in ("params.safetensors", "optimizer.safetensors"):
        a = load_file(os.path.join(whole, "checkpoint", name))
        b = load_file(os.path.join(cut, "checkpoint", name))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == np.float64 and np.array_equal(a[key], b[key]), (name, key)
    history = [json.load(open(os.path.join(d, "checkpoint", "trainer_state.json")))["history"] for d in (whole, cut)]
    assert history[0] == history[1]


def test_bad_input_is_one_line_and_exit_2(tiny_dir, notes, tmp_path, hf_home, capsys):
    proc = subprocess.run([sys.executable, "-m", "npgpt2", "finetune", str(tmp_path / "nope.txt"), "-m", tiny_dir,
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env(hf_home), timeout=120)
    assert proc.returncode == 2
    one_line(proc.stderr, "nope.txt does not exist")

    (tmp_path / "empty.txt").write_text("\n\n")
    code, _, err = in_process(capsys, "finetune", str(tmp_path / "empty.txt"), "-m", tiny_dir, "--out", str(tmp_path / "o"))
    assert code == 2
    one_line(err, "holds no text")

    code, _, err = in_process(capsys, "finetune", notes, "-m", tiny_dir, "--seq-len", "65", "--out", str(tmp_path / "o"))
    assert code == 2
    one_line(err, "seq-len 65", "n_ctx")

    code, _, err = in_process(capsys, "finetune", notes, "-m", tiny_dir, "--out", str(tmp_path / "none"), "--resume")
    assert code == 2
    one_line(err, "no checkpoint to resume")

    code, _, err = in_process(capsys, "eval", notes, "-m", tiny_dir, "--window", "100")
    assert code == 2
    one_line(err, "window=100", "n_ctx")


def test_a_nan_loss_stops_before_the_weights_are_updated(tiny_dir, notes, tmp_path, hf_home):
    # lr 1e30: the first update blows the weights up to ~1e30; the next forward overflows float32
    out = str(tmp_path / "nan")
    proc = subprocess.run([sys.executable, "-m", "npgpt2", "finetune", notes, "-m", tiny_dir, "--out", out,
                           "--lr", "1e30", "--steps", "5", "--checkpoint-every", "1", "--val-fraction", "0", *ARGS[:4]],
                          capture_output=True, text=True, env=env(hf_home), timeout=120)
    assert proc.returncode == 2
    one_line(proc.stderr, "step 2: the loss is nan", "stopped before updating the weights", "--lr")
    state = json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))
    assert state["step"] == 1  # the checkpoint of the last good step is kept
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_a_nan_gradient_leaves_the_weights_untouched(tiny_dir):
    """The loop itself: a step whose loss is NaN raises before AdamW touches a parameter."""
    from npgpt2.training.loop import FinetuneConfig, NonFiniteLossError, RunOptions, finetune

    model = npgpt2.from_pretrained(tiny_dir)
    data = training.TokenDataset.from_texts([TEXT], model.tokenizer)
    real = model.value_and_grad
    calls = []

    def nan_on_second_call(tokens):
        calls.append(1)
        loss, grads = real(tokens)
        return (float("nan") if len(calls) == 2 else loss), grads

    model.value_and_grad = nan_on_second_call
    seen = {}

    def remember_weights():  # polled before each step
        seen["W_E"] = model.weights.W_E.copy()
        return False

    config = FinetuneConfig(steps=3, batch_size=2, seq_len=16, val_fraction=0)
    with pytest.raises(NonFiniteLossError, match="step 2"):
        finetune(model, data, config, RunOptions(progress=False, should_stop=remember_weights))
    assert len(calls) == 2
    assert np.array_equal(model.weights.W_E, seen["W_E"])  # as it was after step 1


def test_grad_accum_steps_on_the_mean_of_its_micro_batches(tiny_dir):
    from npgpt2.training.loop import FinetuneConfig, RunOptions, finetune

    model = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    data = training.TokenDataset.from_texts([TEXT], model.tokenizer)
    config = FinetuneConfig(steps=1, batch_size=1, seq_len=16, grad_accum=3, val_fraction=0, lr=1e-3, seed=4)
    micro = [data.batch(j, 1, 16, seed=4) for j in range(3)]  # step 1 takes micro-batches 0, 1, 2
    expected_loss = np.mean([model.loss(b) for b in micro])
    reference = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    opt = training.AdamW(reference, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    _, grads = reference.value_and_grad(np.concatenate(micro))  # one batch of the three
    training.clip_grad_norm(grads, 1.0)
    opt.step(grads)
    result = finetune(model, data, config, RunOptions(progress=False))
    assert result.history[0]["loss"] == pytest.approx(expected_loss, rel=1e-13)
    for (name, a), (_, b) in zip(training.named_parameters(model.weights), training.named_parameters(reference.weights)):
        assert np.max(np.abs(a - b)) <= 1e-9 * np.max(np.abs(b)), name  # 1e-9: see test_training's accumulation


@pytest.mark.parametrize("change,match", [
    (dict(lr=float("inf")), "lr=inf: expected a finite number >= 0"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(grad_clip=-1.0), "grad_clip=-1.0"),
    (dict(weight_decay=float("nan")), "weight_decay=nan"),
    (dict(betas=(0.9, 1.5)), r"betas=\(0.9, 1.5\): expected two numbers in \[0, 1\)"),
])
def test_settings_that_would_train_to_nan_are_refused_before_a_step(tiny_dir, change, match):
    from npgpt2.training.loop import FinetuneConfig

    config = FinetuneConfig(steps=1, batch_size=1, seq_len=16, **change)
    with pytest.raises(ValueError, match=match):
        config.check(64)


@pytest.mark.parametrize("change,match", [
    (dict(eval_every=-1), "eval_every=-1: expected a whole number of steps >= 0"),
    (dict(checkpoint_every=-2), "checkpoint_every=-2"),
])
def test_run_options_that_would_mislead_are_refused(tiny_dir, change, match):
    from npgpt2.training.loop import FinetuneConfig, RunOptions, finetune

    model = npgpt2.from_pretrained(tiny_dir)
    data = training.TokenDataset.from_texts([TEXT], model.tokenizer)
    with pytest.raises(ValueError, match=match):
        finetune(model, data, FinetuneConfig(steps=1, batch_size=1, seq_len=16, val_fraction=0),
                 RunOptions(progress=False, **change))


def test_an_out_that_is_a_file_is_refused_before_training(tiny_dir, tmp_path):
    from npgpt2.training.loop import FinetuneConfig, RunOptions, finetune

    model = npgpt2.from_pretrained(tiny_dir)
    data = training.TokenDataset.from_texts([TEXT], model.tokenizer)
    out = tmp_path / "taken"
    out.write_text("not a folder")
    steps = []
    with pytest.raises(ValueError, match="is a file: the trained model is written to a folder"):
        finetune(model, data, FinetuneConfig(steps=2, batch_size=1, seq_len=16, val_fraction=0),
                 RunOptions(out=str(out), progress=False, should_stop=lambda: steps.append(1) or False))
    assert steps == []  # refused before the first step


def test_perplexity_past_a_floats_range_is_inf_not_an_overflow(tiny_dir):
    """A mean loss above ~709.8 nats has a perplexity no float holds: inf, with the loss still exact."""
    model = npgpt2.from_pretrained(tiny_dir, dtype="float64")
    b_U = np.zeros(model.cfg.d_vocab)
    b_U[0] = 5000.0  # every prediction is token 0, with a margin of ~5000 nats
    model.set_weight("b_U", None, b_U)
    tokens = np.arange(1, 21)
    result = training.perplexity(model, tokens)
    assert result.loss == pytest.approx(model.loss(tokens), rel=1e-12) and result.loss > 4000
    assert result.perplexity == np.inf


@pytest.fixture(scope="module")
def interrupted_run(tiny_dir, notes, tmp_path_factory):
    """A run stopped after 2 of 4 steps: OUT/checkpoint holds step 2."""
    import shutil

    out = str(tmp_path_factory.mktemp("interrupted") / "run")
    assert cli.main(["finetune", notes, "-m", tiny_dir, "--steps", "4", "--out", out, "--checkpoint-every", "2",
                     "--no-progress", *ARGS[:6]]) == 0
    shutil.rmtree(os.path.join(out, "checkpoint"))
    os.remove(os.path.join(out, "model.safetensors"))
    assert cli.main(["finetune", notes, "-m", tiny_dir, "--steps", "2", "--out", out + "-2",
                     "--no-progress", *ARGS[:6]]) == 0
    shutil.copytree(os.path.join(out + "-2", "checkpoint"), os.path.join(out, "checkpoint"))
    return out


def _copy_run(run, tmp_path):
    import shutil

    return shutil.copytree(run, str(tmp_path / "copy"))


@pytest.mark.parametrize("damage,fragments", [
    (("optimizer.safetensors", "truncate"), ["optimizer.safetensors", "damaged"]),
    (("optimizer.safetensors", "remove"), ["optimizer.safetensors", "missing"]),
    (("trainer_state.json", "truncate"), ["trainer_state.json", "not valid JSON"]),
    (("merges.txt", "truncate"), ["merges.txt"]),
    (("model.safetensors", "truncate"), ["model.safetensors"]),
])
def test_a_damaged_checkpoint_on_resume_is_one_line_naming_the_file(interrupted_run, notes, tmp_path, capsys,
                                                                   damage, fragments):
    out = _copy_run(interrupted_run, tmp_path)
    name, how = damage
    path = os.path.join(out, "checkpoint", name)
    if how == "remove":
        os.remove(path)
    else:
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    code, _, err = in_process(capsys, "finetune", notes, "--out", out, "--resume", "--no-progress")
    assert code == 2, err
    one_line(err, *fragments)


def test_resume_from_the_checkpoint_set_aside_by_a_stopped_save(interrupted_run, notes, tmp_path, capsys):
    """A kill between the checkpoint save's two renames leaves only .checkpoint.old: resuming from
    it works, and so do the saves after it (they used to read the tokenizer files it had deleted)."""
    out = _copy_run(interrupted_run, tmp_path)
    os.rename(os.path.join(out, "checkpoint"), os.path.join(out, ".checkpoint.old"))
    code, stdout, err = in_process(capsys, "finetune", notes, "--out", out, "--resume", "--steps", "4",
                                   "--checkpoint-every", "1", "--no-progress")
    assert code == 0, err
    assert "resuming" in err and "trained 4 steps" in stdout
    state = json.load(open(os.path.join(out, "checkpoint", "trainer_state.json")))
    assert state["step"] == 4 and not os.path.exists(os.path.join(out, ".checkpoint.old"))
