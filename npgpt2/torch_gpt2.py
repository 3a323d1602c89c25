"""GPT-2 written again in torch, one line per step, every hook point kept for its gradient.

The reference for activation gradients: transformers does not expose the tensors inside a block,
so the parity check (``npgpt2 parity --grad``) and the backward tests run this instead, under torch
autograd, and read ``acts[name].grad`` at TransformerLens's hook names. It is checked against
transformers' GPT2LMHeadModel (logits and every parameter gradient) in
tests/test_reference_backward.py. Needs torch (the ``reference`` extra); imported only by them.
"""

from __future__ import annotations


def torch_gpt2(params: dict, tokens, n_head: int, eps: float, acts: dict, cut: str | None = None):
    """GPT-2's logits [batch, pos, d_vocab] from ``params`` (transformers' ``transformer.*`` state
    dict, torch tensors, without the ``attn.bias`` buffers) and ``tokens`` [batch, pos] (a torch
    int64 tensor). Every hook point's tensor goes into ``acts`` under its hook name, with
    ``retain_grad``, so that after ``backward()`` ``acts[name].grad`` is d metric / d activation.
    ``cut``: a hook name whose gradient is zeroed on the way back (torch's register_hook)."""
    import torch

    def keep(name, t):
        t.retain_grad()
        acts[name] = t
        if name == cut:
            t.register_hook(lambda g: g * 0)
        return t

    def ln(prefix, x, w, b):  # [batch, pos, d_model] -> same
        centred = x - x.mean(-1, keepdim=True)
        scale = keep(prefix + "hook_scale", (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt())  # [batch, pos, 1]
        return keep(prefix + "hook_normalized", centred / scale) * w + b

    B, P = tokens.shape
    p = params
    resid = keep("hook_embed", p["wte.weight"][tokens]) + keep("hook_pos_embed", p["wpe.weight"][:P].expand(B, P, -1))
    D = resid.shape[-1]
    Dh = D // n_head
    future = torch.triu(torch.ones(P, P, dtype=torch.bool), 1)  # [query_pos, key_pos]: key after query
    for l in range(sum(1 for k in p if k.endswith("attn.c_attn.weight"))):
        h, name = f"h.{l}.", f"blocks.{l}."
        resid_pre = keep(name + "hook_resid_pre", resid + 0)
        x = ln(name + "ln1.", resid_pre, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        q, k, v = (x @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"]).split(D, -1)
        q, k, v = (keep(name + "attn.hook_" + n, t.reshape(B, P, n_head, Dh)) for n, t in zip("qkv", (q, k, v)))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / Dh ** 0.5  # [batch, head, query_pos, key_pos]
        scores = keep(name + "attn.hook_attn_scores", scores.masked_fill(future, float("-inf")))
        pattern = keep(name + "attn.hook_pattern", scores.softmax(-1))
        z = keep(name + "attn.hook_z", torch.einsum("bhqk,bkhd->bqhd", pattern, v))  # [batch, pos, head, d_head]
        attn_out = keep(name + "hook_attn_out", z.reshape(B, P, D) @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"])
        resid_mid = keep(name + "hook_resid_mid", resid_pre + attn_out)
        x = ln(name + "ln2.", resid_mid, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        pre = keep(name + "mlp.hook_pre", x @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"])  # [batch, pos, d_mlp]
        post = keep(name + "mlp.hook_post", torch.nn.functional.gelu(pre, approximate="tanh"))
        mlp_out = keep(name + "hook_mlp_out", post @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"])
        resid = keep(name + "hook_resid_post", resid_mid + mlp_out)
    x = ln("ln_final.", resid, p["ln_f.weight"], p["ln_f.bias"])
    return x @ p["wte.weight"].T  # [batch, pos, d_vocab]


def torch_params(hf_model) -> dict:
    """transformers' GPT2LMHeadModel -> its ``transformer.*`` weights as fresh leaf tensors that
    require grad, keyed without the prefix (``wte.weight``, ``h.0.ln_1.weight``, ...)."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in hf_model.transformer.state_dict().items()
            if k.split(".")[-2:] not in (["attn", "bias"], ["attn", "masked_bias"])}
