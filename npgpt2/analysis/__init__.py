"""Analyses that run on a model's arrays and return pandas DataFrames.

    next_token_table          per position: the next token's probability, rank, entropy, top-k
    prompt_token_probs        P(next = token_i | prefix up to j) for every prompt token i, position j
    logit_lens                the prediction read off the residual stream after every layer
    direct_logit_attribution  each component's direct effect on an answer's logit (difference)
    ablate, ablation_hook     zero / mean / resample ablation of heads, neurons, layers
    qk_circuit, ov_circuit    per-head circuits as FactoredMatrix; singular_directions as tokens
    composition_scores        Q/K/V composition between heads of different layers
    token_saliency            gradient x input and integrated gradients over the prompt's tokens
    edge_attribution          EAP / EAP-IG scores for every edge; patch_edges, circuit_faithfulness,
                              greedy_circuit, smallest_circuit: exact evaluation of circuits

    patching                  activation patching, TransformerLens's names
    head_detector             head detection scores and induction
"""

from .ablation import ablate, ablation_hook, parse_component
from .attribution import direct_logit_attribution
from .circuits import (FactoredMatrix, composition_frame, composition_scores, ov_circuit, qk_circuit,
                       singular_directions)
from .edges import circuit_faithfulness, edge_attribution, graph_edges, greedy_circuit, patch_edges, smallest_circuit
from .lens import logit_lens
from .saliency import token_saliency
from .tokens import next_token_table, prompt_token_probs

__all__ = ["FactoredMatrix", "ablate", "ablation_hook", "composition_frame", "composition_scores",
           "direct_logit_attribution", "logit_lens", "next_token_table", "ov_circuit", "parse_component",
           "prompt_token_probs", "qk_circuit", "singular_directions", "token_saliency", "edge_attribution",
           "graph_edges", "patch_edges", "circuit_faithfulness", "greedy_circuit", "smallest_circuit"]
