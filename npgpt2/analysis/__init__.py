"""Analyses that run on a model's arrays and return pandas DataFrames.

    next_token_table         per position: the next token's probability, rank, entropy, top-k
    prompt_token_probs       P(next = token_i | prefix up to j) for every prompt token i, position j
    logit_lens               the prediction read off the residual stream after every layer
    direct_logit_attribution each component's direct effect on an answer's logit (difference)
"""

from .attribution import direct_logit_attribution
from .lens import logit_lens
from .tokens import next_token_table, prompt_token_probs

__all__ = ["direct_logit_attribution", "logit_lens", "next_token_table", "prompt_token_probs"]
