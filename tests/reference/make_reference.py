"""Regenerate the stored reference: a small GPT-2 checkpoint and Hugging Face transformers' outputs.

    pip install -e ".[reference]"   # transformers + torch
    python tests/reference/make_reference.py

Writes, next to this file:
  tiny-gpt2/config.json, tiny-gpt2/model.safetensors  random weights in the hub's layout
      (keys without the 'transformer.' prefix, with the h.{i}.attn.bias buffers), a reduced
      vocabulary so the file stays small;
  tiny_gpt2_reference.npz  GPT2LMHeadModel (eager attention) outputs on fixed token ids, run in
      float32 and in float64: logits, every hidden state, every attention pattern;
  realistic-gpt2/config.json, realistic-gpt2/model.safetensors  npgpt2.testing.realistic_state_dict
      weights (real GPT-2's magnitudes: residual norm ~940 at position 0, attention sinks, logits
      near -100) at width 64, n_ctx 256, in the layout newer transformers saves ('transformer.'
      prefix, no mask buffers, which would be most of the file);
  realistic_gpt2_reference.npz  its logits on 160 tokens (three blocks of npgpt2's blockwise
      attention), from GPT2LMHeadModel (eager attention) in float32 and in float64.
The default test suite compares npgpt2 with these without needing torch.
"""

import json
import os

import numpy as np
import torch
import transformers
from transformers import GPT2LMHeadModel

from npgpt2 import GPT2Config
from npgpt2.testing import random_state_dict, realistic_state_dict, write_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = GPT2Config(n_layer=3, n_head=4, n_embd=64, n_ctx=48, vocab_size=512)
TOKENS = np.random.default_rng(7).integers(0, CONFIG.vocab_size, (2, 24))
REALISTIC_CONFIG = GPT2Config(n_layer=3, n_head=4, n_embd=64, n_ctx=256, vocab_size=512)
REALISTIC_SEED = 5
REALISTIC_TOKENS = np.random.default_rng(9).integers(0, REALISTIC_CONFIG.vocab_size, (1, 160))


def main():
    folder = os.path.join(HERE, "tiny-gpt2")
    write_checkpoint(folder, CONFIG, random_state_dict(CONFIG, seed=3), tokenizer_files=False)
    out = {"tokens": TOKENS}
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", dtype=dtype).eval()
        with torch.no_grad():
            res = hf(torch.from_numpy(TOKENS), output_hidden_states=True, output_attentions=True)
        out[f"{name}_logits"] = res.logits.numpy()
        # hidden_states[l] is the residual stream entering block l; the last one is after ln_f
        out[f"{name}_hidden"] = np.stack([h.numpy() for h in res.hidden_states])
        out[f"{name}_attentions"] = np.stack([a.numpy() for a in res.attentions])
    np.savez_compressed(os.path.join(HERE, "tiny_gpt2_reference.npz"), **out)
    with open(os.path.join(HERE, "tiny_gpt2_reference.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "attn_implementation": "eager", "weights_seed": 3, "tokens_seed": 7}, f, indent=2)
    print("wrote", folder, "and tiny_gpt2_reference.npz")
    make_realistic()


def make_realistic():
    folder = os.path.join(HERE, "realistic-gpt2")
    write_checkpoint(folder, REALISTIC_CONFIG,
                     realistic_state_dict(REALISTIC_CONFIG, seed=REALISTIC_SEED, layout="transformers"),
                     tokenizer_files=False)
    out = {"tokens": REALISTIC_TOKENS}
    for name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
        hf = GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager", dtype=dtype).eval()
        with torch.no_grad():
            out[f"{name}_logits"] = hf(torch.from_numpy(REALISTIC_TOKENS)).logits.numpy()
    np.savez_compressed(os.path.join(HERE, "realistic_gpt2_reference.npz"), **out)
    with open(os.path.join(HERE, "realistic_gpt2_reference.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "attn_implementation": "eager", "weights": "npgpt2.testing.realistic_state_dict",
                   "weights_seed": REALISTIC_SEED, "tokens_seed": 9}, f, indent=2)
    print("wrote", folder, "and realistic_gpt2_reference.npz")


if __name__ == "__main__":
    main()
