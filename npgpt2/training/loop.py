"""The fine-tuning loop behind ``npgpt2 finetune``: batches -> (accumulated) gradients -> clipping ->
AdamW, with evaluation on held-out tokens, checkpoints that can be resumed exactly, and a clean stop.

A checkpoint is a folder (``OUT/checkpoint``) holding a model ``save_pretrained`` wrote (so that
``npgpt2 generate -m OUT/checkpoint`` works), the optimizer's state (``optimizer.safetensors``), the
exact parameters when training runs in float64 (``params.safetensors``; float32 ones are the
model file's), and ``trainer_state.json``: the step, the data position, the settings, a fingerprint of
the data and the loss history. It is written beside the old one and then renamed into place, so an
interrupted save leaves the previous checkpoint.

Resuming restores the parameters, the moments, the step count and the data position: batch i of the
run is a function of (seed, i) only (``TokenDataset.batch``), and the learning rate a function of the
step, so the resumed run takes the same steps as an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .adamw import AdamW, accumulate_grad, clip_grad_norm
from .data import DataError, TokenDataset
from .evaluate import perplexity
from .schedule import constant, warmup_cosine

CHECKPOINT = "checkpoint"


class NonFiniteLossError(ValueError):
    """The loss or the gradient norm became NaN or infinite: training stopped before the update."""


@dataclass
class FinetuneConfig:
    """The settings that decide the steps taken (a resumed run keeps them)."""

    steps: int = 200
    batch_size: int = 4
    seq_len: int = 256
    grad_accum: int = 1  # micro-batches of batch_size per step
    lr: float = 3e-4
    min_lr: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"  # "cosine" (warm-up, then cosine decay to min_lr) or "constant" (after warm-up)
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping
    seed: int = 0
    val_fraction: float = 0.1  # 0: no held-out split

    def schedule_fn(self):
        if self.schedule == "cosine":
            return warmup_cosine(self.lr, self.warmup, self.steps, self.min_lr)
        if self.schedule == "constant":
            return warmup_cosine(self.lr, self.warmup, self.warmup, self.lr) if self.warmup else constant(self.lr)
        raise ValueError(f"schedule={self.schedule!r}: expected 'cosine' or 'constant'")

    def check(self, n_ctx: int) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected at least 1")
        if not 2 <= self.seq_len <= n_ctx:
            raise DataError(f"seq-len {self.seq_len}: expected 2..{n_ctx} (the model's n_ctx)")
        if not 0 <= self.val_fraction < 1:
            raise DataError(f"val-fraction {self.val_fraction}: expected 0 (none) or a fraction below 1")
        for name in ("lr", "min_lr", "weight_decay", "eps", "grad_clip", "warmup"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:  # NaN fails too
                raise ValueError(f"{name}={value}: expected a finite number >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas={tuple(self.betas)}: expected two numbers in [0, 1)")
        self.schedule_fn()


@dataclass
class RunOptions:
    """What does not change the steps: where and how often to save and evaluate, how to report."""

    out: str | None = None  # the trained model goes here, checkpoints to out/checkpoint
    eval_every: int = 0  # steps between evaluations on the held-out tokens (0: at the end only)
    eval_tokens: int = 32768  # at most this many held-out tokens per evaluation
    checkpoint_every: int = 0  # steps between checkpoints (0: at the end only)
    stop_after: int | None = None  # stop (with a checkpoint) after this step, as an interruption would
    progress: bool | None = None  # tqdm bar: None = when stderr is a terminal
    should_stop: Callable[[], bool] = lambda: False  # polled between steps (Ctrl-C)
    log: Callable[[str], None] = print

    def check(self) -> None:
        """Refuse what would fail or mislead only after training: negative intervals, an ``out``
        that is a file."""
        for name in ("eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name}={value!r}: expected a whole number of steps >= 0 (0: at the end only)")
        if self.out is not None and os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ValueError(f"out={self.out!r} is a file: the trained model is written to a folder")


@dataclass
class FinetuneResult:
    step: int
    history: list = field(default_factory=list)  # one dict per step: step, loss, grad_norm, lr
    evals: list = field(default_factory=list)  # one dict per evaluation: step, val_loss, val_perplexity
    interrupted: bool = False
    checkpoint: str | None = None


def split_data(data: TokenDataset, config: FinetuneConfig):
    """(train, val or None)."""
    if config.val_fraction:
        train, val = data.split(config.val_fraction)
        if len(val) < 2:
            raise DataError(f"{data.source}: {len(data)} tokens leave no held-out text at val-fraction "
                            f"{config.val_fraction}: give more text or --val-fraction 0")
    else:
        train, val = data, None
    if len(train) < config.seq_len:
        raise DataError(f"{data.source}: {len(train)} training tokens, too few for seq-len {config.seq_len}: "
                        "give more text or a smaller --seq-len")
    return train, val


def finetune(model, data: TokenDataset, config: FinetuneConfig, options: RunOptions | None = None,
             resume: str | None = None) -> FinetuneResult:
    """Train ``model`` on ``data`` for ``config.steps`` steps (see the module's docstring).

    resume: a checkpoint folder to continue from (``model`` must be ``load_checkpoint``'s).
    Raises NonFiniteLossError, without updating the weights, when the loss or gradient norm is not finite.
    """
    options = options or RunOptions()
    config.check(model.cfg.n_ctx)
    options.check()
    train, val = split_data(data, config)
    opt = AdamW(model, lr=config.schedule_fn(), betas=tuple(config.betas), eps=config.eps,
                weight_decay=config.weight_decay)
    result = FinetuneResult(step=0)
    fingerprint = data.fingerprint()
    if resume is not None:
        state = _read_state(resume)
        if state["data_fingerprint"] != fingerprint:
            raise DataError(f"the data differs from the data of the checkpoint in {resume} "
                            f"({state['data_source']}): resume with the same text")
        params_file = os.path.join(resume, "params.safetensors")
        if os.path.exists(params_file):  # exact float64 parameters
            from safetensors.numpy import load_file

            for name, array in load_file(params_file).items():
                opt.params[name][...] = array
        opt.load(os.path.join(resume, "optimizer.safetensors"))
        opt._refresh_model()
        result.step, result.history, result.evals = state["step"], state["history"], state["evals"]
        result.checkpoint = resume
        options.log(f"resuming {model.name} from {resume} at step {result.step} of {config.steps} "
                    "(the checkpoint's settings; --steps may extend the run)")

    from tqdm.auto import tqdm

    tokens_per_step = config.batch_size * config.grad_accum * config.seq_len
    bar = tqdm(total=config.steps, initial=result.step, desc="finetune", unit="step", dynamic_ncols=True,
               disable=None if options.progress is None else not options.progress)
    write = (lambda line: bar.write(line, file=sys.stderr)) if not bar.disable else options.log
    ok = False
    try:
        while result.step < config.steps:
            if options.should_stop() or (options.stop_after is not None and result.step >= options.stop_after):
                result.interrupted = True
                break
            t0 = time.perf_counter()
            k = result.step  # steps done so far; this is step k + 1
            micro = [train.batch(k * config.grad_accum + j, config.batch_size, config.seq_len, config.seed)
                     for j in range(config.grad_accum)]
            with np.errstate(all="ignore"):  # overflow shows as a loss or norm that is not finite, below
                if len(micro) == 1:
                    loss, grads = model.value_and_grad(micro[0])
                else:
                    loss, grads = accumulate_grad(model, micro)
                norm = clip_grad_norm(grads, config.grad_clip if config.grad_clip > 0 else math.inf)
            if not (math.isfinite(loss) and math.isfinite(norm)):
                last = f"; the last checkpoint is in {result.checkpoint}" if result.checkpoint else ""
                raise NonFiniteLossError(
                    f"step {k + 1}: the loss is {loss} and the gradient norm {norm}: stopped before updating "
                    f"the weights{last}; try a lower --lr (now {opt.lr_at(k):.3g}) or --grad-clip")
            lr = opt.step(grads)
            result.step = k + 1
            result.history.append({"step": k + 1, "loss": loss, "grad_norm": norm, "lr": lr})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                            tok_s=f"{tokens_per_step / (time.perf_counter() - t0):,.0f}")
            bar.update(1)
            if val is not None and options.eval_every and result.step % options.eval_every == 0:
                _evaluate(model, val, config, options, result, write)
            if options.out and options.checkpoint_every and result.step % options.checkpoint_every == 0:
                result.checkpoint = save_checkpoint(options.out, model, opt, config, result, data, fingerprint)
        ok = True
    finally:
        if not ok:
            bar.leave = False
        bar.close()
    if not result.interrupted:
        if val is not None and not (result.evals and result.evals[-1]["step"] == result.step):
            _evaluate(model, val, config, options, result, write)
    if options.out:
        result.checkpoint = save_checkpoint(options.out, model, opt, config, result, data, fingerprint)
        if not result.interrupted:
            model.save_pretrained(options.out)
    return result


def _evaluate(model, val, config, options, result, write) -> None:
    tokens = val.tokens[: options.eval_tokens]
    ppl = perplexity(model, tokens, window=min(config.seq_len, len(tokens)))  # split_data: >= 2 tokens
    result.evals.append({"step": result.step, "val_loss": ppl.loss, "val_perplexity": ppl.perplexity})
    train_loss = result.history[-1]["loss"] if result.history else float("nan")
    write(f"step {result.step}: train loss {train_loss:.4f}, val loss {ppl.loss:.4f}, "
          f"val perplexity {ppl.perplexity:.2f} ({ppl.n_tokens} held-out tokens)")


# ------------------------------------------------------------------------------------ checkpoints
def _checkpoint_dir(out: str) -> str:
    return os.path.join(out, CHECKPOINT)


def save_checkpoint(out: str, model, opt: AdamW, config: FinetuneConfig, result: FinetuneResult,
                    data: TokenDataset, fingerprint: str) -> str:
    """Write out/checkpoint (see the module's docstring), replacing the previous one only once complete."""
    from safetensors.numpy import save_file

    final = _checkpoint_dir(out)
    tmp, old = os.path.join(out, f".{CHECKPOINT}.tmp"), os.path.join(out, f".{CHECKPOINT}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    opt.save(os.path.join(tmp, "optimizer.safetensors"))
    if model.dtype != np.float32:
        save_file({n: np.ascontiguousarray(p) for n, p in opt.params.items()}, os.path.join(tmp, "params.safetensors"))
    state = {"step": result.step, "data_position": result.step * config.grad_accum, "dtype": str(model.dtype),
             "config": dataclasses.asdict(config), "base_model": model.name, "data_source": data.source,
             "data_fingerprint": fingerprint, "history": result.history, "evals": result.evals}
    with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump(state, f, indent=1)
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(out: str) -> str:
    """out/checkpoint. If a save stopped between its two renames, only the previous one is there,
    as out/.checkpoint.old: it is put back in place first, so that nothing loaded from it (the
    tokenizer's files) lives in a folder the next save deletes."""
    final, old = _checkpoint_dir(out), os.path.join(out, f".{CHECKPOINT}.old")
    if not os.path.exists(final) and os.path.isfile(os.path.join(old, "trainer_state.json")):
        os.replace(old, final)
    for folder in (final, old):
        if os.path.isfile(os.path.join(folder, "trainer_state.json")):
            return folder
    raise DataError(f"no checkpoint to resume in {out} (expected {_checkpoint_dir(out)}/trainer_state.json): "
                    "run without --resume first, with --checkpoint-every N")


def _read_state(folder: str) -> dict:
    path = os.path.join(folder, "trainer_state.json")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e}): the checkpoint is damaged; "
                            "start again without --resume") from None


def load_checkpoint(out: str):
    """(model, config, folder) of the checkpoint in ``out``, the model in the dtype it trained in."""
    from ..loading import from_pretrained

    folder = find_checkpoint(out)
    state = _read_state(folder)
    config = state["config"]
    config["betas"] = tuple(config["betas"])
    model = from_pretrained(folder, dtype=state["dtype"])
    model.name = state["base_model"]
    return model, FinetuneConfig(**config), folder
