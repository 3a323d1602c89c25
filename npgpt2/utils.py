"""TransformerLens's ``utils`` functions that analysis code reaches for, on NumPy arrays.

    from npgpt2 import utils
    utils.get_act_name("resid_pre", 3)         # 'blocks.3.hook_resid_pre'
    utils.test_prompt("The cat sat on the", "mat", model)
"""

from __future__ import annotations

import numpy as np

from . import ops
from .names import get_act_name  # noqa: F401  (utils.get_act_name, as in TransformerLens)

__all__ = ["get_act_name", "get_corner", "get_device", "lm_accuracy", "lm_cross_entropy_loss",
           "remove_batch_dim", "test_prompt", "to_numpy", "transpose"]


def to_numpy(x) -> np.ndarray:
    """An array, list, tuple, number or torch tensor -> a NumPy array (TransformerLens's ``to_numpy``;
    arrays pass through unchanged). A torch tensor is detached and copied to the CPU first."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple)):
        return np.array(x)
    if isinstance(x, (int, float, bool, str, np.generic)):
        return np.array(x)
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            x = x.float()
        return x.numpy()
    raise ValueError(f"to_numpy takes an array, list, tuple, number or torch tensor; got {type(x).__name__}")


def get_corner(x, n: int = 3):
    """The top-left corner of every axis: ``x[:n, :n, ...]`` (a FactoredMatrix forms only its corner:
    anything with its own ``get_corner`` is asked for it)."""
    if not isinstance(x, np.ndarray) and callable(getattr(x, "get_corner", None)):
        return x.get_corner(n)
    x = np.asarray(x)
    return x[tuple(slice(n) for _ in range(x.ndim))]


def remove_batch_dim(x: np.ndarray) -> np.ndarray:
    """[1, ...] -> [...]; any other array unchanged."""
    x = np.asarray(x)
    return x[0] if x.ndim and x.shape[0] == 1 else x


def transpose(x: np.ndarray) -> np.ndarray:
    """Swap the last two axes."""
    return np.asarray(x).swapaxes(-1, -2)


def get_device() -> str:
    """npgpt2 computes with NumPy on the CPU: always "cpu"."""
    return "cpu"


def lm_cross_entropy_loss(logits, tokens, attention_mask=None, per_token: bool = False):
    """Next-token cross-entropy, TransformerLens's ``utils.lm_cross_entropy_loss``.

    logits [batch, pos, d_vocab], tokens [batch, pos]. ``per_token=True`` -> [batch, pos - 1] (the
    loss of predicting token p + 1 at p), else the mean, a float. With ``attention_mask`` [batch, pos]
    a prediction counts only when both its position and the next are real tokens; as in
    TransformerLens, per-token losses are 0 where they do not count, and the mean is over those
    that do.
    """
    logits, tokens = np.asarray(logits), np.asarray(tokens)
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"expected logits [batch, pos, d_vocab] and tokens [batch, pos]; got {logits.shape} "
                         f"and {tokens.shape}")
    nll = ops.cross_entropy(logits[:, :-1], tokens[:, 1:].astype(np.int64))  # [batch, pos - 1]
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {mask.shape}; expected {tokens.shape}, the tokens' shape")
        counts = np.logical_and(mask[:, :-1], mask[:, 1:])  # [batch, pos - 1]
        nll = np.where(counts, nll, 0).astype(nll.dtype)
        n_tokens = int(counts.sum())
    else:
        n_tokens = nll.size
    if per_token:
        return nll
    return float(nll.sum() / n_tokens)


def lm_accuracy(logits, tokens, per_token: bool = False):
    """Top-1 next-token accuracy: [batch, pos - 1] booleans, or their mean."""
    logits, tokens = np.asarray(logits), np.asarray(tokens)
    correct = logits.argmax(-1)[:, :-1] == tokens[:, 1:]
    return correct if per_token else float(correct.mean())


def test_prompt(prompt: str, answer, model, prepend_space_to_answer: bool = True, print_details: bool = True,
                prepend_bos: bool | None = None, top_k: int = 10) -> None:
    """Print how the model does on ``answer`` after ``prompt`` (TransformerLens's ``test_prompt``).

    Prints the tokenized prompt and answer, then for each answer token its rank, logit and
    probability and the ``top_k`` tokens there; then the ranks of the answer tokens. ``answer`` may
    be a list of texts: then only their first tokens are compared, as alternative next tokens.
    ``prepend_bos`` None means ``model.cfg.default_prepend_bos`` (False unless set). Returns None.
    """
    if prepend_bos is None:
        prepend_bos = bool(getattr(model.cfg, "default_prepend_bos", False))
    answers = [answer] if isinstance(answer, str) else list(answer)
    if not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"answer must be a str or a non-empty list of str; got {answer!r}")
    multiple = len(answers) > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_ids = list(model.to_tokens(prompt, prepend_bos=prepend_bos)[0])
    answer_ids = [model.tokenizer.encode(a) for a in answers]
    if any(not ids for ids in answer_ids):
        raise ValueError(f"an answer has no tokens: {answers!r}")
    if multiple:
        answer_ids = [ids[:1] for ids in answer_ids]
    elif len(prompt_ids) + len(answer_ids[0]) > model.cfg.n_ctx:
        raise ValueError(f"prompt and answer are {len(prompt_ids) + len(answer_ids[0])} tokens; the context is {model.cfg.n_ctx}")
    tokens = np.array([prompt_ids + ids for ids in answer_ids], dtype=np.int64)  # [n_answers, pos]
    prompt_str = [model.tokenizer.token_str(t) for t in prompt_ids]
    answer_str = [[model.tokenizer.token_str(t) for t in ids] for ids in answer_ids]
    if print_details:
        print("Tokenized prompt:", prompt_str)
        if multiple:
            print("Tokenized answers:", answer_str)
        else:
            print("Tokenized answer:", answer_str[0])
    logits = np.asarray(model(tokens), dtype=np.float64)  # [n_answers, pos, d_vocab]
    probs = ops.softmax(logits)
    n = len(prompt_ids)
    ranks = []
    for index in range(n, n + len(answer_ids[0])):
        wanted = tokens[:, index]  # [n_answers]
        p = probs[:, index - 1]  # [n_answers, d_vocab]: the prediction of the token at `index`
        order = np.argsort(-p, axis=-1, kind="stable")
        rank = [int(np.nonzero(order[i] == wanted[i])[0][0]) for i in range(len(wanted))]
        ranks.append([(answer_str[i][index - n], rank[i]) for i in range(len(wanted))])
        if print_details:
            print(f"Performance on answer token{'s' if multiple else ''}:")
            for i in range(len(wanted)):
                print(f"Rank: {rank[i]: <8} Logit: {logits[i, index - 1, wanted[i]]:5.2f} "
                      f"Prob: {p[i, wanted[i]]:6.2%} Token: |{answer_str[i][index - n]}|")
            for k in range(top_k):
                t = order[0, k]
                print(f"Top {k}th token. Logit: {logits[0, index - 1, t]:5.2f} Prob: {p[0, t]:6.2%} "
                      f"Token: |{model.tokenizer.token_str(t)}|")
    if multiple:
        print("Ranks of the answer tokens:", ranks)
    else:
        print("Ranks of the answer tokens:", [r[0] for r in ranks])


test_prompt.__test__ = False  # not a pytest test, despite its name
