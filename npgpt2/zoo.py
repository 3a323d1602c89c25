"""Small GPT-2s with a real circuit, trained here by npgpt2's own training code.

Real GPT-2 weights are a download away; these are not. ``induction()`` is a 2-layer GPT-2 (attention
and MLP blocks, layer norms, learned positions) with a vocabulary of 300 English words, trained on
sequences of random words whose second half repeats the first. Nothing in it is set by hand: the
circuit that solves the task, a previous-token head in layer 0 whose output the keys of an induction
head in layer 1 read (K-composition), forms during training, after a plateau, as in Olsson et al.
(2022), "In-context learning and induction heads".

    model = npgpt2.zoo.induction()              # built once (about a minute on 2 cores), then cached
    model.to_str_tokens("cat dog tree cat dog") # [' cat', ' dog', ' tree', ' cat', ' dog']

The build is a function of the seed and the recipe only: the same seed gives the same weights, bit for
bit, on one machine (``training.json`` in the folder keeps their SHA-256). It is saved in the hub's
layout (``config.json``, ``model.safetensors``, ``tokenizer.json``), so ``npgpt2.from_pretrained(folder)``
and transformers' ``GPT2LMHeadModel.from_pretrained(folder)`` both load it. The cache is a folder
beside the Hugging Face cache (``$HF_HOME/npgpt2-zoo``); ``npgpt2 zoo build induction --out DIR``
writes one anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import metrics, ops
from .config import GPT2Config
from .tokenizer import WordTokenizer

# 299 common English words, each one GPT-2 token with its leading space (" cat"), so that tables and
# pictures read as words and the same strings mean the same thing to gpt2; <|endoftext|> is id 299.
WORDS = tuple("""
cat dog bird fish horse cow pig sheep goat duck mouse rat lion tiger bear wolf fox deer rabbit snake
frog whale shark monkey eagle owl bee ant fly spider apple bread cake milk tea coffee rice soup egg
cheese meat salt sugar honey butter corn bean fruit orange lemon grape pear peach cherry banana potato
tomato onion pepper red blue green yellow black white brown pink purple gray gold silver house door
window wall roof floor room bed chair table desk lamp clock book pen paper letter box bag cup glass
plate bowl knife fork spoon bottle key lock ring car bus train ship boat plane bike road street bridge
river lake sea ocean island mountain hill forest tree flower grass leaf stone rock sand snow rain wind
storm cloud sun moon star sky fire water ice smoke city town village farm garden park school church
hospital office shop market bank hotel library museum prison castle tower palace temple king queen
prince child baby boy girl man woman father mother brother sister friend doctor teacher student farmer
soldier captain judge priest artist writer singer driver hand foot head face eye ear nose mouth tooth
hair arm leg heart blood bone skin song music dance game story film picture color shape line circle
square dream idea word name voice sound light shadow morning evening night day week month year summer
winter spring autumn iron copper steel wood cotton wool silk run walk jump swim sing read write cook
sleep eat drink play laugh cry fight build draw paint open close push pull throw catch climb big small
old new hot cold fast slow happy sad dark bright soft hard loud quiet rich poor young tall short one
two three four five six seven eight nine ten north south east
""".split())


@dataclass(frozen=True)
class InductionRecipe:
    """Everything that decides the induction model's weights, besides the seed."""

    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    n_inner: int | None = None  # the MLP's width (None: 4 * n_embd, as GPT-2)
    n_ctx: int = 64  # at least 1 + max_prefix + 2 * max_period
    min_period: int = 5  # each batch's repeated words: this many, or up to max_period
    max_period: int = 20
    max_prefix: int = 20  # each batch starts with 0 .. max_prefix other random words
    max_gap: int = 0  # and has 0 .. max_gap other random words between the two copies
    copies: int = 2  # the repeated words appear this many times
    other_weight: float = 1.0  # weight in the loss of the predictions nothing can be copied for (the copyable ones': 1)
    init_std: float = 0.02  # the weights' initial standard deviation (GPT-2's: 0.02)
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100  # steps of linear warm-up, then a constant learning rate
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 4000
    target_loss: float = 0.05  # stop once the copyable words' loss (a running mean) is below this
    check_every: int = 50  # steps between looks at that running mean

    def config(self) -> GPT2Config:
        return GPT2Config(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, n_ctx=self.n_ctx,
                          n_inner=self.n_inner, vocab_size=len(WORDS) + 1)

    def fingerprint(self) -> str:
        """A short hash of the recipe and the vocabulary: a cached build of another recipe is not reused."""
        text = json.dumps([dataclasses.asdict(self), WORDS], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


def induction_tokenizer() -> WordTokenizer:
    """The induction model's vocabulary: ``WORDS``, then <|endoftext|>."""
    return WordTokenizer(WORDS)


def repeated_batch(rng: np.random.Generator, batch: int, period: int, prefix: int, n_words: int,
                   bos: int, gap: int = 0, copies: int = 2) -> np.ndarray:
    """[batch, 1 + prefix + period + gap + (copies - 1) * period]: <|endoftext|>, ``prefix`` random
    words, ``period`` random words, ``gap`` other random words, then the ``period`` words again
    (``copies - 1`` times).

    The words of a row are distinct, so every word of a repeat has one earlier occurrence to look
    back to. The prefix's random length moves the repeat about, so that where a word's copy is can be
    found only by what the words are, not by counting positions."""
    words = np.argsort(rng.random((batch, n_words)), axis=1)[:, :prefix + period + gap]  # [batch, ...], distinct
    segment = words[:, prefix:prefix + period]  # [batch, period]
    return np.concatenate([np.full((batch, 1), bos), words] + [segment] * (copies - 1), axis=1).astype(np.int64)


class RepeatLoss(metrics.Loss):
    """The training loss: the copyable predictions (the repeat's second word on) weighted 1, the others
    ``other_weight``. ``copy_loss`` keeps the mean loss of the copyable predictions alone."""

    def __init__(self, tokens, first_copyable: int, other_weight: float = 1.0):
        batch, pos = np.shape(tokens)
        self.first_copyable = first_copyable  # the first prediction of a word that can be copied (p predicts token p + 1)
        weights = np.full((batch, pos - 1), float(other_weight))
        weights[:, self.first_copyable:] = 1
        super().__init__(tokens, weights=weights)
        self.copy_loss = float("nan")

    def value_and_grad(self, logits, out=None):
        p = self.first_copyable
        nll = ops.cross_entropy(logits[:, p:-1], self.tokens[:, p + 1:])  # [batch, copyable]
        self.copy_loss = float(nll.astype(np.float64).mean())
        return super().value_and_grad(logits, out=out)


def training_batches(recipe: InductionRecipe, seed: int):
    """The recipe's batches, one per step: (tokens [batch, pos], its RepeatLoss). A function of
    (recipe, seed) only."""
    rng = np.random.default_rng([seed, 1])  # the data's own stream, apart from the initialisation's
    bos = len(WORDS)  # <|endoftext|>, after the words
    for _ in range(recipe.max_steps):
        period = int(rng.integers(recipe.min_period, recipe.max_period + 1))
        prefix = int(rng.integers(0, recipe.max_prefix + 1))
        gap = int(rng.integers(0, recipe.max_gap + 1)) if recipe.max_gap else 0
        tokens = repeated_batch(rng, recipe.batch_size, period, prefix, len(WORDS), bos, gap, recipe.copies)
        second_copy = 1 + prefix + period + gap  # where the first repeat starts; its second word on is copyable
        yield tokens, RepeatLoss(tokens, second_copy, recipe.other_weight)


def train_induction(seed: int = 0, recipe: InductionRecipe = InductionRecipe(), progress: bool | None = None,
                    log=None):
    """Train the induction model from GPT-2's initialisation. -> (model, history)

    history: one dict per step: step, loss (the training loss), copy_loss (the copyable words' loss,
    nats), lr. Deterministic given (seed, recipe) on one machine. progress: a tqdm bar (None: when
    stderr is a terminal).
    """
    from tqdm.auto import tqdm

    from . import training

    tokenizer = induction_tokenizer()
    model = training.new_model(recipe.config(), seed=seed, tokenizer=tokenizer, name=f"induction-seed{seed}",
                               std=recipe.init_std)
    model.fast_path = False  # a model this small runs fastest on one thread, the textbook path
    opt = training.AdamW(model, lr=training.warmup_cosine(recipe.lr, recipe.warmup, recipe.warmup, recipe.lr),
                         betas=(0.9, 0.98), weight_decay=recipe.weight_decay)
    history, running = [], None
    bar = tqdm(total=recipe.max_steps, desc="induction", unit="step", dynamic_ncols=True,
               disable=None if progress is None else not progress)
    try:
        for step, (tokens, metric) in enumerate(training_batches(recipe, seed), start=1):
            loss, grads = model.value_and_grad(tokens, metric=metric)
            training.clip_grad_norm(grads, recipe.grad_clip)
            lr = opt.step(grads)
            history.append({"step": step, "loss": loss, "copy_loss": metric.copy_loss, "lr": lr})
            running = metric.copy_loss if running is None else 0.95 * running + 0.05 * metric.copy_loss
            bar.update(1)
            if step % recipe.check_every == 0:
                bar.set_postfix(copy_loss=f"{running:.3f}")
                if log is not None and progress is False:
                    log(f"step {step}: loss {loss:.3f}, copyable words' loss {running:.3f}")
                if running < recipe.target_loss:
                    break
    finally:
        bar.close()
    model.fast_path = True
    if log is not None:
        log(f"induction model, seed {seed}: {len(history)} steps, copyable words' loss {running:.4f}")
    return model, history


def weights_sha256(folder: str) -> str:
    """SHA-256 of the saved model.safetensors."""
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def cache_folder(seed: int = 0, recipe: InductionRecipe = InductionRecipe()) -> str:
    """Where ``induction(seed)`` keeps its build: ``$HF_HOME/npgpt2-zoo/induction-<recipe>-seed<seed>``."""
    from huggingface_hub import constants

    return os.path.join(constants.HF_HOME, "npgpt2-zoo", f"induction-{recipe.fingerprint()}-seed{seed}")


def build_induction(out: str | None = None, seed: int = 0, recipe: InductionRecipe = InductionRecipe(),
                    progress: bool | None = None, log=None) -> str:
    """Train the induction model and save it in the hub's layout into ``out`` (default: the cache).
    Returns the folder. ``training.json`` there records the recipe, the seed, the steps, the final
    loss, the build time and the weights' SHA-256."""
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: expected a non-negative integer")
    folder = os.fspath(out) if out is not None else cache_folder(seed, recipe)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise FileExistsError(f"--out {folder} is a file: expected a folder (new or existing)")
    t0 = time.perf_counter()
    model, history = train_induction(seed, recipe, progress, log)
    seconds = time.perf_counter() - t0
    staging = f"{folder}.tmp-{os.getpid()}"  # complete before it takes the folder's name
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tail = [h["copy_loss"] for h in history[-recipe.check_every:]]
    record = {"model": "induction", "seed": int(seed), "recipe": dataclasses.asdict(recipe),
              "recipe_fingerprint": recipe.fingerprint(), "steps": len(history),
              "final_copy_loss": float(np.mean(tail)), "build_seconds": round(seconds, 1),
              "weights_sha256": weights_sha256(staging),
              "copy_loss_every_50_steps": [round(h["copy_loss"], 4) for h in history[::50]]}
    with open(os.path.join(staging, "training.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    os.replace(staging, folder)
    if log is not None:
        log(f"saved to {folder} in {seconds:.1f} s (weights sha256 {record['weights_sha256'][:16]}...)")
    return folder


def induction(seed: int = 0, dtype: str = "float32", progress: bool | None = None, **load_kwargs):
    """The trained induction model: loaded from the cache, or built there first (about a minute).

    seed: which build (each seed trains its own). dtype and ``load_kwargs`` (``fold_ln=True``, ...)
    go to ``npgpt2.from_pretrained``. ``model.files.source`` is the folder.
    """
    from .loading import from_pretrained

    folder = cache_folder(seed)
    if not os.path.isfile(os.path.join(folder, "training.json")):
        build_induction(folder, seed=seed, progress=progress,
                        log=lambda line: print(line, file=sys.stderr))
    model = from_pretrained(folder, dtype=dtype, **load_kwargs)
    model.name = f"induction-seed{seed}"
    return model
