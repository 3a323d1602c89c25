"""Small GPT-2s with a real circuit, trained here by npgpt2's own training code.

Real GPT-2 weights are a download away; these are not. ``induction()`` is a 2-layer GPT-2 (attention
and MLP blocks, layer norms, learned positions) with a vocabulary of 300 English words, trained to
copy runs of words recalled from earlier in its context, each run at its own distance from where it
came from (``recall_batch``). Nothing in it is set by hand: the circuit that solves the task,
previous-token heads in layer 0 whose output the keys of induction heads in layer 1 read
(K-composition), forms during training, after a plateau, as in Olsson et al. (2022), "In-context
learning and induction heads". On the classic task (random words, then the same words again,
``repeated_batch``), which it never saw as such, it copies the repeat.

    model = npgpt2.zoo.induction()              # built once (900 steps for seed 0), then cached
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

from . import metrics
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
    n_ctx: int = 72  # at least 1 + max_memory + recalled + max_run - 1
    min_memory: int = 12  # each batch: min_memory .. max_memory distinct random words,
    max_memory: int = 30
    recalled: int = 24  # then at least this many words recalled from them,
    max_run: int = 12  # in runs of 2 .. max_run neighbouring words
    init_std: float = 0.1  # the weights' initial standard deviation (GPT-2's 0.02; TransformerLens's 0.8 / sqrt(d_model))
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100  # steps of linear warm-up, then a constant learning rate
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_steps: int = 6000
    target_loss: float = 0.1  # stop once the copyable words' loss (a running mean) is below this
    check_every: int = 50  # steps between looks at that running mean

    def config(self) -> GPT2Config:
        return GPT2Config(n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd, n_ctx=self.n_ctx,
                          n_inner=self.n_inner, vocab_size=len(WORDS) + 1)

    def fingerprint(self) -> str:
        """A short hash of the recipe, the vocabulary and the training code's version: a cached build
        of another recipe, or of other training arithmetic, is not reused."""
        text = json.dumps([dataclasses.asdict(self), WORDS, TRAINING_CODE], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


# raised when the training's arithmetic changes (and with it the weights a seed gives): 2 = the
# gradients of fast.py's blocks, on every core; 3 = a narrow model's taller tiles, GELU's slope
# kept from the forward pass; 4 = GELU as x / (1 + exp(-2u)), its slope from the same exponential
TRAINING_CODE = 4


def induction_tokenizer() -> WordTokenizer:
    """The induction model's vocabulary: ``WORDS``, then <|endoftext|>."""
    return WordTokenizer(WORDS)


def _distinct_words(rng: np.random.Generator, batch: int, n_words: int, k: int) -> np.ndarray:
    """[batch, k] word ids, distinct within each row (a random permutation's first k)."""
    return np.argsort(rng.random((batch, n_words)), axis=1)[:, :k]


def repeated_batch(rng: np.random.Generator, batch: int, period: int, prefix: int, n_words: int,
                   bos: int) -> np.ndarray:
    """The classic induction task: [batch, 1 + prefix + 2 * period] rows of <|endoftext|>, ``prefix``
    random words, ``period`` random words, then the ``period`` words again. The words of a row are
    distinct, so every word of the repeat has one earlier occurrence to look back to."""
    words = _distinct_words(rng, batch, n_words, prefix + period)  # [batch, prefix + period]
    return np.concatenate([np.full((batch, 1), bos), words, words[:, prefix:]], axis=1).astype(np.int64)


def repeat_pair(rng: np.random.Generator, batch: int, period: int, prefix: int, cut: int, n_words: int,
                bos: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A clean and a corrupted run of the classic task, for patching and circuits:
    (clean [batch, pos], corrupted [batch, pos], answers [batch]), pos = 1 + prefix + period + cut.

    Clean rows are ``repeated_batch``'s, cut ``cut`` words into the repeat, so their next word is known
    from the first copy (``answers``). Corrupted rows have other words in the first copy (words the
    row does not use), so nothing earlier says what comes next; everything else is the same."""
    if not 1 <= cut < period:
        raise ValueError(f"cut={cut!r}: expected 1 <= cut < period ({period})")
    clean = repeated_batch(rng, batch, period, prefix, n_words, bos)
    first = slice(1 + prefix, 1 + prefix + period)
    corrupted = clean.copy()
    for row, words in zip(corrupted, clean):
        unused = np.setdiff1d(np.arange(n_words), words)
        row[first] = rng.choice(unused, period, replace=False)
    end = 1 + prefix + period + cut
    return clean[:, :end], corrupted[:, :end], clean[:, end]


def recall_batch(rng: np.random.Generator, batch: int, memory: int, recalled: int, n_words: int, bos: int,
                 max_run: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``memory`` distinct random words, then runs of neighbouring words taken from them again
    (words i, i + 1, ..., for a random i and a run of 2 .. ``max_run`` words, at most ``memory``) until at least
    ``recalled`` words follow: [batch, 1 + memory + recalled'], and the copyable mask [batch, pos - 1],
    True at the predictions of each run's second word on (prediction p is of token p + 1).

    Every run lies at its own distance from where it came from, so only what the words are says
    where to look: the current word's earlier occurrence, and the word after it."""
    words = _distinct_words(rng, batch, n_words, memory)  # [batch, memory]
    rows = np.arange(batch)[:, None]
    runs, copyable = [], [np.zeros((batch, memory + 1), dtype=bool)]  # predictions from <|endoftext|> and the memory
    total = 0
    while total < recalled:
        r = int(rng.integers(2, min(max_run, memory) + 1))
        start = rng.integers(0, memory - r + 1, (batch, 1))  # [batch, 1]
        runs.append(words[rows, start + np.arange(r)])  # [batch, r]
        copyable.append(np.repeat([[True] * (r - 1) + [False]], batch, axis=0))  # the run's 2nd..rth words
        total += r
    tokens = np.concatenate([np.full((batch, 1), bos), words] + runs, axis=1).astype(np.int64)
    copyable = np.concatenate(copyable, axis=1)[:, :tokens.shape[1] - 1]
    return tokens, copyable


def training_batches(recipe: InductionRecipe, seed: int):
    """The recipe's batches, one per step: (tokens [batch, pos], their loss: the mean next-word loss of
    the copyable predictions alone, ``recall_batch``'s mask as the weights). A function of (recipe,
    seed) only."""
    rng = np.random.default_rng([seed, 1])  # the data's own stream, apart from the initialisation's
    bos = len(WORDS)  # <|endoftext|>, after the words
    for _ in range(recipe.max_steps):
        memory = int(rng.integers(recipe.min_memory, recipe.max_memory + 1))
        tokens, copyable = recall_batch(rng, recipe.batch_size, memory, recipe.recalled, len(WORDS), bos,
                                        recipe.max_run)
        yield tokens, metrics.Loss(tokens, weights=copyable)


def train_induction(seed: int = 0, recipe: InductionRecipe = InductionRecipe(), progress: bool | None = None,
                    log=None):
    """Train the induction model from GPT-2's initialisation scheme (``init_std``). -> (model, history)

    history: one dict per step: step, loss (the copyable words' loss, nats), lr. Deterministic given (seed, recipe) on one machine. progress: a tqdm bar (None: when
    stderr is a terminal).
    """
    from tqdm.auto import tqdm

    from . import training

    tokenizer = induction_tokenizer()
    model = training.new_model(recipe.config(), seed=seed, tokenizer=tokenizer, name=f"induction-seed{seed}",
                               std=recipe.init_std)
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
            history.append({"step": step, "loss": loss, "lr": lr})
            running = loss if running is None else 0.95 * running + 0.05 * loss
            bar.update(1)
            if step % recipe.check_every == 0:
                bar.set_postfix(copy_loss=f"{running:.3f}")
                if log is not None and progress is False:
                    log(f"step {step}: copyable words' loss {running:.3f} (running mean)")
                if running < recipe.target_loss:
                    break
    finally:
        bar.close()
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
    if os.path.exists(folder) and not os.path.isdir(folder):  # (before the training, not after it)
        raise ValueError(f"--out {folder} is a file: expected a folder (new or existing)")
    t0 = time.perf_counter()
    model, history = train_induction(seed, recipe, progress, log)
    seconds = time.perf_counter() - t0
    staging = f"{folder}.tmp-{os.getpid()}"  # complete before it takes the folder's name
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tail = [h["loss"] for h in history[-recipe.check_every:]]
    record = {"model": "induction", "seed": int(seed), "recipe": dataclasses.asdict(recipe),
              "recipe_fingerprint": recipe.fingerprint(), "steps": len(history),
              "final_copy_loss": float(np.mean(tail)), "build_seconds": round(seconds, 1),
              "weights_sha256": weights_sha256(staging),
              "copy_loss_every_50_steps": [round(h["loss"], 4) for h in history[::50]]}
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
    """The trained induction model: loaded from the cache, or built there first (900 steps for seed 0).

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
